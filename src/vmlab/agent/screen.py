"""Guest side of the dashboard's screenshots: mirror the console onto the VGA text screen.

/init pipes its own output and the agent's through this script when the node has a VGA
device. Every line is copied to stdout (the serial console, which the host keeps as
console.log) first, then the newest lines are drawn into VGA text memory (80x25 cells at
physical 0xB8000, through /dev/mem), so the host's QMP `screendump` shows the guest's own
text. The kernel cannot do this itself: booted through PVH it gets no screen_info, so its
VGA console stays disabled and `console=tty0` goes nowhere.

It must never stop reading: /init and the agent write into its pipe, and a dead reader
would break their output (and /init falls back to `cat` if this script cannot start).
Drawing failures only turn drawing off. Only builtin modules: the appliance ships just the
stdlib modules agent.py imports, so no `mmap` (writes go through os.pwrite instead).
"""
import os
import sys
import time

COLS, ROWS = 80, 25
VGA_TEXT = 0xB8000
ATTR_TEXT = 0x07   # light grey on black
ATTR_BAR = 0x70    # black on light grey
ATTR_MARK = 0x0A   # light green: vmlab's own lines


class Screen:
    def __init__(self, path="/dev/mem", offset=VGA_TEXT):
        self.fd = os.open(path, os.O_WRONLY | os.O_SYNC)
        self.offset = offset
        self.lines = []
        self._hide_cursor()

    @staticmethod
    def _hide_cursor():
        # CRTC register 0x0A bit 5 disables the cursor SeaBIOS left blinking.
        try:
            fd = os.open("/dev/port", os.O_WRONLY)
            try:
                os.pwrite(fd, b"\x0a", 0x3D4)
                os.pwrite(fd, b"\x20", 0x3D5)
            finally:
                os.close(fd)
        except OSError:
            pass

    def add(self, text):
        text = text.expandtabs(8)
        attr = ATTR_MARK if text.startswith("vmlab-") else ATTR_TEXT  # for every wrapped row
        while True:
            self.lines.append((text[:COLS], attr))
            text = text[COLS:]
            if not text:
                break
        del self.lines[:-(ROWS - 1)]

    def draw(self):
        try:
            host = open("/proc/sys/kernel/hostname").read().strip()
            up = float(open("/proc/uptime").read().split()[0])
        except OSError:
            host, up = "?", 0.0
        bar = f" vmlab node {host}".ljust(COLS - 16) + f"up {up:9.1f} s  "
        cells = bytearray()
        for ch in bar[:COLS].ljust(COLS):
            cells += bytes((_cp(ch), ATTR_BAR))
        for row in range(ROWS - 1):
            line, attr = self.lines[row] if row < len(self.lines) else ("", ATTR_TEXT)
            for ch in line.ljust(COLS):
                cells += bytes((_cp(ch), attr))
        os.pwrite(self.fd, bytes(cells), self.offset)


def _cp(ch):
    o = ord(ch)
    return o if 32 <= o < 127 else 0x3F  # '?' for what code page 437 would garble


def main():
    out = sys.stdout.buffer
    try:
        screen = Screen()
    except OSError as err:
        screen = None
        out.write(f"vmlab-screen: no VGA text screen ({err}); console to serial only\n".encode())
        out.flush()
    if screen is not None:
        try:
            screen.draw()
        except Exception:
            screen = None
    inp = sys.stdin.buffer
    while True:
        raw = inp.readline()
        if not raw:  # every writer closed: wait for the next one rather than exit
            time.sleep(0.2)
            continue
        try:
            out.write(raw)
            out.flush()
        except OSError:
            pass
        if screen is not None:
            try:
                screen.add(raw.decode("utf-8", "replace").rstrip("\r\n"))
                screen.draw()
            except Exception:
                screen = None


if __name__ == "__main__":
    main()
