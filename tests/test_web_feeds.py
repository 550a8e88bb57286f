"""Console and screen feeds (no VMs): line splitting, tailing a growing file, thumbnails."""
from __future__ import annotations

import asyncio
import base64
import io

from PIL import Image

from vmlab.errors import VmlabError
from vmlab.web.eventbus import EventBus, EventKind
from vmlab.web.feeds import ConsoleSplitter, make_thumbnail, poll_screen, tail_console


def test_splitter_keeps_partial_lines_and_cleans_them():
    sp = ConsoleSplitter()
    assert sp.feed(b"vmlab-init: sta") == []
    assert sp.feed(b"rting agent\r\n\x1b[1;32mgreen\x1b[0m\n\n  \nbad \xff byte\n") == [
        "vmlab-init: starting agent", "green", "bad \ufffd byte"]


def test_splitter_flushes_an_endless_line():
    sp = ConsoleSplitter(line_max=10)
    assert sp.feed(b"x" * 25) == ["x" * 10]


def test_tail_console_follows_appends(tmp_path):
    path = tmp_path / "console.log"

    async def main():
        bus = EventBus()
        task = asyncio.ensure_future(tail_console(path, "alice", bus.publish, poll_s=0.01))
        await asyncio.sleep(0.05)  # the file does not exist yet: must wait, not fail
        with open(path, "ab") as f:
            f.write(b"one\ntw")
            f.flush()
            await asyncio.sleep(0.1)
            f.write(b"o\nthree\n")
            f.flush()
            await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return [(e.node, e.message) for e in bus.history() if e.kind is EventKind.CONSOLE]

    assert asyncio.run(main()) == [("alice", "one"), ("alice", "two"), ("alice", "three")]


def _ppm(color, size=(720, 400)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PPM")
    return out.getvalue()


def test_make_thumbnail():
    screen = make_thumbnail(_ppm((10, 200, 30)))
    assert screen.size == (720, 400)
    assert screen.thumbnail.startswith("data:image/jpeg;base64,")
    thumb = Image.open(io.BytesIO(base64.b64decode(screen.thumbnail.split(",", 1)[1])))
    assert thumb.format == "JPEG" and thumb.size == (360, 200)
    full = Image.open(io.BytesIO(screen.png))
    assert full.format == "PNG" and full.size == (720, 400)


def test_poll_screen_publishes_only_changes_and_survives_failures(tmp_path):
    dumps = [_ppm((0, 0, 0)), _ppm((0, 0, 0)), None, _ppm((255, 255, 255))]
    seen = []

    async def screendump(path):
        data = dumps.pop(0) if dumps else None
        if data is None:
            raise VmlabError("QEMU is gone")
        with open(path, "wb") as f:
            f.write(data)

    async def main():
        task = asyncio.ensure_future(poll_screen("alice", screendump, tmp_path / "s.ppm",
                                                 seen.append, interval_s=0.01))
        for _ in range(300):
            await asyncio.sleep(0.01)
            if len(seen) >= 2 and not dumps:
                break
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert len(seen) == 2  # black once (the repeat is skipped), then white
    assert Image.open(io.BytesIO(seen[1].png)).getpixel((0, 0)) == (255, 255, 255)
