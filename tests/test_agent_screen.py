"""The guest's console-to-VGA mirror (agent/screen.py), drawing into a file, not /dev/mem."""
from __future__ import annotations

from vmlab.agent import screen


def _rows(data: bytes) -> list[tuple[str, int]]:
    cells = [(chr(data[i]), data[i + 1]) for i in range(0, len(data), 2)]
    return [("".join(c for c, _ in cells[r * 80:(r + 1) * 80]).rstrip(), cells[r * 80][1])
            for r in range(25)]


def test_draws_bar_and_newest_lines_wrapped(tmp_path):
    f = tmp_path / "mem"
    f.write_bytes(b"\0" * 4000)
    s = screen.Screen(path=str(f), offset=0)
    for i in range(30):
        s.add(f"line {i}")
    s.add("vmlab-agent: connected " + "x" * 80)   # wraps onto a second row
    s.add("caf\u00e9\tend")
    s.draw()
    rows = _rows(f.read_bytes())
    assert rows[0][0].startswith(" vmlab node ") and rows[0][1] == screen.ATTR_BAR
    assert rows[-1] == ("caf?    end", screen.ATTR_TEXT)
    assert rows[-3][0].startswith("vmlab-agent: connected") and rows[-3][1] == screen.ATTR_MARK
    assert rows[-2] == ("x" * 23, screen.ATTR_MARK)  # a wrapped row keeps its line's colour
    assert rows[1][0] == "line 9"  # 24 text rows: the oldest lines scrolled away
