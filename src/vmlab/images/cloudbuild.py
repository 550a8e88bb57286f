"""A Debian 12 "generic cloud" qcow2 built here from Debian packages, for the `cloud` kind.

It is made the way cloud.debian.org's images are, and holds nothing of vmlab's: GRUB on an
MBR disk (images/bootdisk.py), the cloud kernel with an initramfs-tools initramfs, udev
(so NICs get predictable names such as ens3), ifupdown, openssh-server and cloud-init with
its NoCloud datasource. vmlab uses it where no cloud image can be downloaded (this project's
own tests, offline machines), through the same path as any other: `file://` URL + sha256.

    $ vmlab image cloud-qcow2
    ImageSpec("cloud", url="file:///root/.cache/vmlab/images/debian-cloud-qcow2-.../disk.qcow2",
              sha256="...")

Entry `images/debian-cloud-qcow2-<digest12>/`: `disk.qcow2` and `image.json` (its sha256,
the packages installed). The digest covers the recipe (package list, kernel command line,
disk size); like the debian image, package versions are what the mirror serves at build time.
Building needs root (debootstrap and grub-mkimage run chrooted) and the Debian mirror.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from . import bootdisk, cache, debian
from .debs import sha256_file
from .tools import run

__all__ = ["ensure", "LocalCloudImage", "PACKAGES"]

RECIPE_VERSION = 1
NAME = "debian-cloud-qcow2"
DISK_BYTES = 4 << 30
#: What a Debian generic cloud image has that a test needs. python3-cffi-backend: debootstrap
#: does not resolve the virtual package python3-cryptography (a cloud-init dependency) needs.
PACKAGES = ["systemd-sysv", "udev", "openssh-server", "python3", "iproute2", "ifupdown",
            "iputils-ping", "cloud-init", "python3-cffi-backend",
            "linux-image-cloud-amd64", "initramfs-tools", "grub-pc-bin"]
KERNEL_CMDLINE = "root=LABEL=root ro console=tty0 console=ttyS0,115200"


@dataclass(frozen=True)
class LocalCloudImage:
    path: Path
    sha256: str

    @property
    def url(self) -> str:
        return self.path.as_uri()

    def spec(self):
        """The `cloud` ImageSpec that boots this file."""
        from . import ImageSpec
        return ImageSpec("cloud", url=self.url, sha256=self.sha256)


def recipe_digest() -> str:
    return cache.digest_of({"recipe": RECIPE_VERSION, "suite": debian.SUITE,
                            "packages": PACKAGES, "cmdline": KERNEL_CMDLINE, "disk": DISK_BYTES,
                            "core_modules": bootdisk.CORE_MODULES})


def ensure(*, force: bool = False, progress=None) -> LocalCloudImage:
    """The cached qcow2, building it first (a few minutes: debootstrap, then the disk)."""
    report = progress or (lambda *a: None)
    digest = recipe_digest()
    found = None if force else cache.read_entry_meta(NAME, digest)
    if found is not None:
        entry, meta = found
        return LocalCloudImage(entry / "disk.qcow2", meta["sha256"])
    cache.images_dir()
    t0 = time.monotonic()
    with cache.building(NAME) as tmp:
        rootfs, entry = tmp / "rootfs", tmp / "entry"
        entry.mkdir()
        debootstrap_s = debian.debootstrap(rootfs, PACKAGES, report, NAME)
        kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
        initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
        if len(kernels) != 1 or len(initrds) != 1:
            from ..errors import ImageBuildError
            raise ImageBuildError(f"{NAME}: expected one kernel and one initrd in /boot, found "
                                  f"{[p.name for p in kernels + initrds]}")
        _configure(rootfs)
        installed = run(["chroot", str(rootfs), "dpkg-query", "-W", "-f",
                         "${Package} ${Version}\n"], "listing installed packages")
        report(f"{NAME}: writing the disk (MBR, GRUB, ext4)", None, None)
        raw = tmp / "disk.raw"
        cfg = bootdisk.grub_cfg(f"/boot/{kernels[0].name}", f"/boot/{initrds[0].name}",
                                KERNEL_CMDLINE, "Debian GNU/Linux 12 (bookworm)")
        bootdisk.write_bios_disk(rootfs, raw, size_bytes=DISK_BYTES, cfg=cfg)
        run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(entry / "disk.qcow2")],
            "qemu-img convert")
        raw.unlink()
        report(f"{NAME}: hashing the qcow2", None, None)
        sha = sha256_file(entry / "disk.qcow2")
        meta = {"name": NAME, "digest": digest, "sha256": sha, "kernel": kernels[0].name,
                "debootstrap_s": round(debootstrap_s, 1),
                "bytes": (entry / "disk.qcow2").stat().st_size,
                "installed": dict(ln.split(" ", 1) for ln in installed.splitlines() if " " in ln),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (entry / "image.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        final = cache.publish(tmp, NAME, digest, replace=force)
    report(f"{NAME}: built in {time.monotonic() - t0:.1f} s (debootstrap {debootstrap_s:.0f} s, "
           f"{meta['bytes'] / 1e6:.0f} MB, sha256 {sha[:12]})", None, None)
    return LocalCloudImage(final / "disk.qcow2", sha)


def _configure(rootfs: Path) -> None:
    """What a cloud image's build leaves behind: root found by label, a neutral hostname, no
    SSH host keys and no machine-id (each instance makes its own at first boot)."""
    etc = rootfs / "etc"
    (etc / "fstab").write_text("LABEL=root / ext4 defaults,errors=remount-ro 0 1\n")
    (etc / "hostname").write_text("localhost\n")
    for key in (etc / "ssh").glob("ssh_host_*"):
        key.unlink()
    (etc / "machine-id").write_text("")
    (rootfs / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    # The system locale set, as Debian's cloud images have it: cloud-init's locale module
    # then has nothing to do (it would otherwise run locale-gen, minutes under TCG).
    (etc / "default/locale").write_text("LANG=C.UTF-8\n")
    apt = rootfs / "var/cache/apt/archives"
    for deb in apt.glob("*.deb"):
        deb.unlink()
