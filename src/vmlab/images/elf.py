"""Just enough ELF64 reading for image builds: notes, DT_NEEDED and a kernel module's modinfo.

Reading the files ourselves keeps binutils (readelf) and kmod (modinfo) off the list of host
tools an image build needs.
"""
from __future__ import annotations

import struct
from pathlib import Path

__all__ = ["ElfFile", "XEN_ELFNOTE_PHYS32_ENTRY"]

# The note that makes a vmlinux bootable through PVH (`-kernel vmlinux` in QEMU): name "Xen",
# type XEN_ELFNOTE_PHYS32_ENTRY (include/xen/interface/elfnote.h).
XEN_ELFNOTE_PHYS32_ENTRY = 0x12
_SHT_NOTE, _SHT_DYNAMIC = 7, 6
_PT_NOTE = 4
_DT_NEEDED, _DT_STRTAB = 1, 5


class ElfFile:
    """A parsed little-endian ELF64 file (x86_64 is all vmlab builds for)."""

    def __init__(self, data: bytes, name: str = "<bytes>"):
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise ValueError(f"{name}: not a little-endian ELF64 file")
        self.data, self.name = data, name
        (self.e_phoff, self.e_shoff) = struct.unpack_from("<QQ", data, 0x20)
        (self.e_phentsize, self.e_phnum, self.e_shentsize, self.e_shnum,
         self.e_shstrndx) = struct.unpack_from("<HHHHH", data, 0x36)

    @classmethod
    def read(cls, path: Path) -> "ElfFile":
        return cls(Path(path).read_bytes(), str(path))

    def sections(self) -> list[tuple[str, int, int, int, int]]:
        """[(name, type, offset, size, link)] for every section."""
        raw = []
        for i in range(self.e_shnum):
            off = self.e_shoff + i * self.e_shentsize
            name, stype, _flags, _addr, offset, size, link = struct.unpack_from("<IIQQQQI", self.data, off)
            raw.append((name, stype, offset, size, link))
        if not raw:
            return []
        str_off = raw[self.e_shstrndx][2]
        return [(self._cstr(str_off + n), t, o, s, lk) for n, t, o, s, lk in raw]

    def section(self, name: str) -> bytes | None:
        for sname, _t, offset, size, _lk in self.sections():
            if sname == name:
                return self.data[offset:offset + size]
        return None

    def notes(self) -> list[tuple[str, int, bytes]]:
        """[(owner, type, desc)] from the PT_NOTE segments (or SHT_NOTE sections if none)."""
        spans = []
        for i in range(self.e_phnum):
            off = self.e_phoff + i * self.e_phentsize
            ptype, _flags, offset, _va, _pa, filesz = struct.unpack_from("<IIQQQQ", self.data, off)
            if ptype == _PT_NOTE:
                spans.append((offset, filesz))
        if not spans:
            spans = [(o, s) for _n, t, o, s, _lk in self.sections() if t == _SHT_NOTE]
        out = []
        for offset, size in spans:
            pos, end = offset, offset + size
            while pos + 12 <= end:
                namesz, descsz, ntype = struct.unpack_from("<III", self.data, pos)
                pos += 12
                owner = self.data[pos:pos + namesz].rstrip(b"\0").decode(errors="replace")
                pos += (namesz + 3) & ~3
                out.append((owner, ntype, self.data[pos:pos + descsz]))
                pos += (descsz + 3) & ~3
        return out

    def has_pvh_note(self) -> bool:
        return any(o == "Xen" and t == XEN_ELFNOTE_PHYS32_ENTRY for o, t, _ in self.notes())

    def needed(self) -> list[str]:
        """The DT_NEEDED shared libraries (empty for a static binary)."""
        secs = self.sections()
        for _name, stype, offset, size, link in secs:
            if stype != _SHT_DYNAMIC:
                continue
            str_off = secs[link][2]
            out = []
            for pos in range(offset, offset + size, 16):
                tag, val = struct.unpack_from("<qQ", self.data, pos)
                if tag == 0:
                    break
                if tag == _DT_NEEDED:
                    out.append(self._cstr(str_off + val))
            return out
        return []

    def modinfo(self) -> dict[str, str]:
        """A kernel module's .modinfo strings as a dict (later duplicates win; fine for depends=)."""
        raw = self.section(".modinfo") or b""
        out = {}
        for item in raw.split(b"\0"):
            key, sep, value = item.decode(errors="replace").partition("=")
            if sep:
                out[key] = value
        return out

    def _cstr(self, off: int) -> str:
        end = self.data.index(b"\0", off)
        return self.data[off:end].decode(errors="replace")
