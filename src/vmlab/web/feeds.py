"""Feeds: turn a running node's console file and screen into EventBus events.

Two loops per node, both on the Env's loop:

- `tail_console` follows the node's `console.log` (QEMU writes it through a file chardev, so
  it keeps everything even if we die) every `CONSOLE_POLL_S`, reading only what was appended,
  and publishes one `console_output` event per complete line.
- `poll_screen` asks QEMU for a `screendump` every `SCREEN_INTERVAL_S` and, when the screen
  changed, publishes a JPEG thumbnail (as a data URI) and keeps the full-size PNG for
  `/screenshot/{node}`. Pillow's work runs in a worker thread so the loop stays free.

Producing the screen (the display device, `console=tty0`) is vm/qemu.py's job; what events
mean for the page is web/status.py's.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from ..errors import VmlabError
from .eventbus import Event, EventKind

__all__ = ["tail_console", "poll_screen", "make_thumbnail", "ConsoleSplitter", "Screen",
           "CONSOLE_POLL_S", "SCREEN_INTERVAL_S", "THUMB_WIDTH"]

log = logging.getLogger("vmlab.web.feeds")

#: How often the console file is checked for new bytes (cheap: one fstat when idle).
CONSOLE_POLL_S = 0.1
#: At most this much of the console is read per poll, so a guest flooding its serial port
#: cannot hold the loop; the rest is read on the next polls.
CONSOLE_READ_MAX = 256 * 1024
#: Longer console lines are cut (a guest printing a binary blob with no newline).
CONSOLE_LINE_MAX = 2000
#: DESIGN.md's budget: a thumbnail every 2 s per node, under 5% of a core per node.
SCREEN_INTERVAL_S = 2.0
THUMB_WIDTH = 360
THUMB_JPEG_QUALITY = 70
#: The screendump file format: PPM costs QEMU ~6 ms per dump against ~25 ms for PNG
#: (reference/measurements-net-channels.md §4); we encode a PNG only when the screen changed.
SCREENDUMP_FORMAT = "ppm"

# CSI and OSC escape sequences (colours, cursor moves) mean nothing in the page's <pre>.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


class ConsoleSplitter:
    """Bytes in, complete display lines out; keeps a partial last line for the next call."""

    def __init__(self, line_max: int = CONSOLE_LINE_MAX):
        self._partial = b""
        self._line_max = line_max

    def feed(self, data: bytes) -> list[str]:
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        if len(self._partial) > self._line_max:  # no newline for a long while: flush it
            lines.append(self._partial)
            self._partial = b""
        out = []
        for raw in lines:
            text = _ANSI.sub("", raw.decode("utf-8", "replace")).replace("\r", "")
            text = "".join(c for c in text if c == "\t" or c >= " ")
            if text.strip():
                out.append(text[:self._line_max])
        return out


async def tail_console(path: Path, node: str, publish: Callable[[Event], object], *,
                       poll_s: float = CONSOLE_POLL_S) -> None:
    """Publish each new line of `path` as a console event, until cancelled. Starts from the
    beginning of the file (a node's console.log is new per run)."""
    splitter = ConsoleSplitter()
    offset = 0
    f = None
    try:
        while True:
            if f is None:
                try:
                    f = open(path, "rb")
                except FileNotFoundError:
                    await asyncio.sleep(poll_s)
                    continue
            size = os.fstat(f.fileno()).st_size
            if size < offset:  # truncated (a new run in the same dir): start over
                offset = 0
                splitter = ConsoleSplitter()
            if size > offset:
                # A regular file read of at most CONSOLE_READ_MAX does not block meaningfully.
                f.seek(offset)
                data = f.read(min(size - offset, CONSOLE_READ_MAX))
                offset += len(data)
                for line in splitter.feed(data):
                    publish(Event(EventKind.CONSOLE, node, line))
                if size > offset:
                    await asyncio.sleep(0)  # more to read: yield, then go on
                    continue
            await asyncio.sleep(poll_s)
    finally:
        if f is not None:
            f.close()


@dataclass(frozen=True)
class Screen:
    """One processed screendump."""
    thumbnail: str          # data:image/jpeg;base64,...
    png: bytes              # full resolution
    size: tuple[int, int]


def make_thumbnail(dump: bytes, *, width: int = THUMB_WIDTH,
                   quality: int = THUMB_JPEG_QUALITY) -> Screen:
    """A screendump (PPM or PNG bytes) to a JPEG thumbnail data URI plus a full-size PNG."""
    from PIL import Image  # imported here: only the dashboard needs Pillow

    with Image.open(io.BytesIO(dump)) as im:
        im = im.convert("RGB")
        size = im.size
        png = io.BytesIO()
        # compress_level 1: a text screen compresses well anyway, and it costs a fraction of
        # the default level's CPU.
        im.save(png, "PNG", compress_level=1)
        thumb = im.copy()
        thumb.thumbnail((width, width * size[1] // max(1, size[0])), Image.Resampling.BILINEAR)
        jpeg = io.BytesIO()
        thumb.save(jpeg, "JPEG", quality=quality)
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode("ascii")
    return Screen(uri, png.getvalue(), size)


async def poll_screen(node: str, screendump: Callable[[str], Awaitable[object]], dump_path: Path,
                      on_screen: Callable[[Screen], None], *,
                      interval_s: float = SCREEN_INTERVAL_S) -> None:
    """Every `interval_s`, call `screendump(path)` (a QMP screendump into `dump_path`); when
    the screen changed, build a `Screen` in a worker thread and pass it to `on_screen`.
    Runs until cancelled; a failed dump is logged once and retried next time (the node may
    still be starting, or may have been killed)."""
    last_digest = None
    failing = False
    while True:
        try:
            await screendump(str(dump_path))
            data = await asyncio.to_thread(dump_path.read_bytes)
        except (VmlabError, OSError) as err:
            if not failing:
                log.info("%s: screendump failed (%s); retrying every %.0f s", node, err,
                         interval_s)
            failing = True
        else:
            failing = False
            digest = hashlib.blake2b(data, digest_size=16).digest()
            if digest != last_digest:
                last_digest = digest
                try:
                    screen = await asyncio.to_thread(make_thumbnail, data)
                except Exception as err:  # a torn or unknown dump: skip this one
                    log.warning("%s: could not decode screendump: %s", node, err)
                else:
                    on_screen(screen)
        await asyncio.sleep(interval_s)
