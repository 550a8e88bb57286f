"""A deterministic writer for the `newc` cpio format the kernel unpacks as an initramfs.

Written in Python rather than piping `find | cpio` so that device nodes (/dev/console) can be
added without root, and so that owners and mtimes are fixed (same tree, same bytes).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

__all__ = ["CpioWriter", "write_tree"]

_MTIME = 0  # fixed, for reproducible archives


class CpioWriter:
    """Appends newc entries to a binary stream; call close() to write the trailer."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.ino = 0
        self.written = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self.ino, mode, 0, 0, nlink, _MTIME, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        buf = header + encoded
        buf += b"\0" * (-len(buf) % 4)
        buf += data
        buf += b"\0" * (-len(data) % 4)
        self.out.write(buf)
        self.written += len(buf)

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)
        self.out.write(b"\0" * (-self.written % 512))


def write_tree(root: Path, out: BinaryIO) -> CpioWriter:
    """Add every directory, file and symlink under `root` (sorted, paths relative to it).

    Returns the writer, still open, so the caller can add device nodes before close().
    """
    w = CpioWriter(out)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir != ".":
            w.directory(rel_dir, stat.S_IMODE(os.lstat(dirpath).st_mode))
        names = sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))])
        for fname in names:
            path = os.path.join(dirpath, fname)
            rel = os.path.normpath(os.path.join(rel_dir, fname))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                w.symlink(rel, os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                w.file(rel, Path(path).read_bytes(), stat.S_IMODE(st.st_mode))
    return w
