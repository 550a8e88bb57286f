"""A BIOS-bootable disk from a root directory: MBR partition table, one ext4 partition, GRUB.

Nothing is mounted and no loop device is used, so it runs anywhere mkfs.ext4 does:

  sector 0          GRUB's boot.img (the first 440 bytes) and a one-entry MBR partition table
  sectors 1..2047   GRUB's core.img (the "MBR gap"), with biosdisk, part_msdos and ext2 built in
  sector 2048..     the ext4 root partition, made by `mkfs.ext4 -d` straight into the file at
                    that offset; /boot/grub holds grub.cfg and the modules `normal` loads

core.img comes from `grub-mkimage`, which sets the length of its own blocklist; boot.img's
default pointer (core.img at sector 1) is left as it is, which is what `grub-bios-setup` does
for an MBR gap install. The GRUB files come from the root directory itself (grub-pc-bin
installed in it), so the host needs no GRUB.
"""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

from ..errors import ImageBuildError
from .tools import run

__all__ = ["write_bios_disk", "mbr", "grub_cfg", "PARTITION_START"]

SECTOR = 512
#: The first partition starts at 1 MiB, as every modern partitioner does; core.img lives before it.
PARTITION_START = 2048
_GRUB_PC = "usr/lib/grub/i386-pc"
#: Built into core.img: enough to read grub.cfg from an ext4 partition of an MBR disk.
CORE_MODULES = ["biosdisk", "part_msdos", "ext2"]
_BOOT_CODE = 440  # boot.img bytes before the disk signature and the partition table


def mbr(disk_sectors: int, boot_code: bytes, disk_id: int) -> bytes:
    """Sector 0: `boot_code`, disk signature, one bootable Linux partition from
    PARTITION_START to the end (LBA addressing; the CHS fields say "use LBA")."""
    if len(boot_code) > _BOOT_CODE:
        boot_code = boot_code[:_BOOT_CODE]
    count = disk_sectors - PARTITION_START
    if count <= 0 or disk_sectors > 0xFFFFFFFF:
        raise ImageBuildError(f"a {disk_sectors}-sector disk cannot hold an MBR partition")
    entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff",
                        PARTITION_START, count)
    sector = bytearray(SECTOR)
    sector[:len(boot_code)] = boot_code
    struct.pack_into("<I", sector, _BOOT_CODE, disk_id)
    sector[446:462] = entry
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def grub_cfg(kernel: str, initrd: str | None, cmdline: str, title: str) -> str:
    """A one-entry grub.cfg that boots at once; paths are inside the root partition."""
    lines = ["set timeout=0", "set default=0", f"menuentry '{title}' {{",
             f"  linux {kernel} {cmdline}"]
    if initrd:
        lines.append(f"  initrd {initrd}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_bios_disk(rootfs: Path, out: Path, *, size_bytes: int, cfg: str, label: str = "root",
                    disk_id: int = 0x766D6C62) -> None:
    """Make `out` (raw) a `size_bytes` disk that boots `rootfs` through GRUB with `cfg`.

    `rootfs` must contain grub-pc-bin's files (/usr/lib/grub/i386-pc) and a working
    `grub-mkimage` (it is run chrooted, so building needs root, as debootstrap does)."""
    grub_pc = rootfs / _GRUB_PC
    if not (grub_pc / "boot.img").exists():
        raise ImageBuildError(f"{rootfs} has no {_GRUB_PC}/boot.img: install grub-pc-bin in it")
    if size_bytes % SECTOR:
        raise ImageBuildError(f"disk size {size_bytes} is not a whole number of sectors")
    grub_dir = rootfs / "boot/grub"
    (grub_dir / "i386-pc").mkdir(parents=True, exist_ok=True)
    for mod in list(grub_pc.glob("*.mod")) + list(grub_pc.glob("*.lst")):
        shutil.copyfile(mod, grub_dir / "i386-pc" / mod.name)
    (grub_dir / "grub.cfg").write_text(cfg)
    core_in_root = Path("/tmp/vmlab-core.img")
    run(["chroot", str(rootfs), "grub-mkimage", "-O", "i386-pc", "-o", str(core_in_root),
          "-p", "(hd0,msdos1)/boot/grub", *CORE_MODULES], "grub-mkimage", timeout_s=300)
    core = (rootfs / core_in_root.relative_to("/")).read_bytes()
    (rootfs / core_in_root.relative_to("/")).unlink()
    if len(core) > (PARTITION_START - 1) * SECTOR:
        raise ImageBuildError(f"core.img is {len(core)} bytes; it must fit before sector "
                              f"{PARTITION_START}")
    sectors = size_bytes // SECTOR
    with open(out, "wb") as f:
        f.truncate(size_bytes)
        f.write(mbr(sectors, (grub_pc / "boot.img").read_bytes(), disk_id))
        f.write(core)
    part_kib = (sectors - PARTITION_START) * SECTOR // 1024
    run(["mkfs.ext4", "-q", "-F", "-L", label, "-E",
          f"offset={PARTITION_START * SECTOR},lazy_itable_init=0,lazy_journal_init=0",
          "-d", str(rootfs), str(out), f"{part_kib}k"], "mkfs.ext4", timeout_s=900)
