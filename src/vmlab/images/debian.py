"""The `debian` image: Debian 12 with systemd on a qcow2 disk, booted with Debian's cloud kernel.

What is in it, and why:
  disk.qcow2           debootstrap --variant=minbase bookworm with systemd-sysv, openssh-server,
                       python3, iproute2 and busybox (its udhcpc serves a cold boot's DHCP and
                       its ping the agent's /ping), plus the caller's extra `packages`; ext4
                       made with lazy init off (no ext4lazyinit writes after boot), then qcow2
  vmlinux              the PVH vmlinux of linux-image-cloud-amd64 (same as the appliance's)
  initrd.cpio          busybox-static and the virtio modules, in load order; its /init mounts
                       /dev/vda and switch_roots to systemd (the cloud kernel has VIRTIO_BLK=m,
                       so root on virtio-blk needs this; measurements-boot-snapshot §4)
  ssh_key, ssh_key.pub generated once per image entry; the public half is root's
                       authorized_keys, the private half lets snapshot preparation log in

Units that only slow a test VM (journald, random-seed, sysusers, gettys, timers, ...) are
masked (`MASKED_UNITS`, from measurements-boot-snapshot §4: 14.5 s -> 7.8 s to multi-user).
The vmlab agent is NOT in the image: snapshot preparation installs it over SSH as a systemd
unit (snapshot/prepare.py), the way the reference installs its agent on macOS. The unit
`vmlab-prep-net.service` gives the preparation NIC (MAC `PREP_MAC`, QEMU user networking)
10.0.2.15/24 with no default route, so SSH can reach the guest and nothing else is touched.

Caching: `recipe_key()` hashes every local input (recipe version, suite, package list, masked
units, the boot and prep-net scripts, kernel args); the kernel and busybox-static versions
are resolved once per key (`images/debian*.resolved.json`) and join the digest. Packages
debootstrap installs are whatever the mirror serves at build time; they are listed in
image.json, and newer ones are picked up only when the recipe key changes or on `force=True`,
so the digest (and every snapshot on it) stays stable between runs. Building needs root
(debootstrap chroots), the `debootstrap` package and network access to the Debian mirror.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from ..errors import ImageBuildError
from . import cache, debs
from .appliance import KERNEL_ARGS as APPLIANCE_KERNEL_ARGS
from .appliance import KERNEL_META_PACKAGE, extract_vmlinux, module_load_order
from .cpio import write_tree
from .tools import run

__all__ = ["ensure", "recipe_key", "image_name", "MASKED_UNITS", "PREP_MAC", "PREP_GUEST_IP",
           "BASE_PACKAGES"]

# Bump when the build procedure changes in a way the inputs below do not capture.
RECIPE_VERSION = 1
NAME = "debian"
SUITE = "bookworm"
MEMORY_MB = 256
DISK_SIZE = "4G"  # virtual size; the qcow2 only holds what is written
BASE_PACKAGES = ["systemd-sysv", "openssh-server", "python3", "iproute2", "busybox"]
INITRD_PACKAGES = ["busybox-static"]
# virtio_blk for the root disk; the NIC, host-channel and vsock drivers are loaded in the
# initramfs too: without udev nothing would load them later, and loaded modules survive
# switch_root. Dependencies follow from each module's depends= field.
MODULE_ROOTS = ["virtio_pci", "virtio_blk", "virtio_net", "virtio_console",
                "vmw_vsock_virtio_transport"]
#: The preparation NIC's MAC and the guest's address on QEMU's user network (its default).
PREP_MAC = "52:cc:cc:cc:fe:00"
PREP_GUEST_IP = "10.0.2.15"
KERNEL_ARGS = APPLIANCE_KERNEL_ARGS + " root=/dev/vda rw"

#: measurements-boot-snapshot §4's trimmed set (minus systemd-user-sessions, which removes
#: /run/nologin) and the gettys, timers and daemons a test VM has no use for.
MASKED_UNITS = [
    "systemd-journald.service", "systemd-journald.socket", "systemd-journald-dev-log.socket",
    "systemd-journald-audit.socket", "systemd-journal-flush.service",
    "systemd-random-seed.service", "systemd-sysusers.service", "systemd-sysctl.service",
    "systemd-modules-load.service", "dev-hugepages.mount", "dev-mqueue.mount",
    "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount", "modprobe@configfs.service", "modprobe@dm_mod.service",
    "modprobe@fuse.service", "modprobe@loop.service", "modprobe@drm.service",
    "modprobe@efi_pstore.service", "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service", "systemd-remount-fs.service",
    "systemd-tmpfiles-setup-dev.service", "proc-sys-fs-binfmt_misc.automount",
    "systemd-binfmt.service", "systemd-machine-id-commit.service", "systemd-firstboot.service",
    "kmod-static-nodes.service", "systemd-tmpfiles-clean.timer", "ldconfig.service",
    "systemd-network-generator.service", "systemd-ask-password-console.path",
    "systemd-ask-password-wall.path", "systemd-update-done.service", "systemd-fsck-root.service",
    "systemd-boot-system-token.service", "cryptsetup.target", "swap.target",
    "veritysetup.target", "integritysetup.target", "remote-fs.target",
    "serial-getty@ttyS0.service", "getty@tty1.service", "apt-daily.timer",
    "apt-daily-upgrade.timer", "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer",
    "dpkg-db-backup.timer", "systemd-pstore.service", "systemd-timesyncd.service",
    "systemd-logind.service",
]

# The initramfs's /init: load the modules, mount the root disk, hand over to systemd.
INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do
  [ -n "$m" ] && { insmod "/lib/modules/$m.ko" || echo "vmlab-initrd: insmod $m failed"; }
done < /modules.list
root=/dev/vda
for word in $(cat /proc/cmdline); do
  case "$word" in root=/dev/*) root=${word#root=} ;; esac
done
# virtio-blk probes synchronously at insmod, but give a slow host a few seconds anyway.
i=0
while [ ! -b "$root" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
mount -t ext4 -o rw "$root" /newroot || { echo "vmlab-initrd: cannot mount $root"; exec sh; }
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"""

# Configures only the NIC with PREP_MAC (the snapshot-preparation NIC), and only the address:
# no default route, so a restored node's own default route (set by the agent) never clashes.
PREP_NET_SCRIPT = f"""#!/bin/sh
for dev in /sys/class/net/*; do
  if [ "$(cat "$dev/address")" = "{PREP_MAC}" ]; then
    ip link set dev "${{dev##*/}}" up
    ip addr replace {PREP_GUEST_IP}/24 dev "${{dev##*/}}"
  fi
done
exit 0
"""

PREP_NET_UNIT = """[Unit]
Description=vmlab snapshot-preparation NIC (SSH over QEMU user networking)
Before=ssh.service
DefaultDependencies=no
After=local-fs.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vmlab-prep-net

[Install]
WantedBy=multi-user.target
"""

_MULTIARCH = "x86_64-linux-gnu"
_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")


def image_name(packages: tuple[str, ...] = ()) -> str:
    """`debian`, or `debian+<8 hex>` for an image with extra packages (its own cache entry)."""
    if not packages:
        return NAME
    return f"{NAME}+{hashlib.sha256(' '.join(sorted(packages)).encode()).hexdigest()[:8]}"


def recipe_key(packages: tuple[str, ...] = ()) -> str:
    """sha256 of every local input of the recipe (no package versions: see image_digest)."""
    return cache.digest_of({
        "recipe": RECIPE_VERSION, "suite": SUITE, "kernel_meta": KERNEL_META_PACKAGE,
        "packages": BASE_PACKAGES + sorted(packages), "initrd_packages": INITRD_PACKAGES,
        "modules": MODULE_ROOTS, "masked": MASKED_UNITS, "init": INIT_SCRIPT,
        "prep_net": PREP_NET_SCRIPT + PREP_NET_UNIT, "kernel_args": KERNEL_ARGS,
        "disk_size": DISK_SIZE,
    })


def _check_packages(packages) -> tuple[str, ...]:
    from ..errors import ConfigError
    if isinstance(packages, (str, bytes)) or not hasattr(packages, "__iter__"):
        raise ConfigError(f"debian image: packages must be a list of Debian package names, "
                          f"like packages=['curl'], not {packages!r}")
    items = list(packages)
    bad = [p for p in items if not isinstance(p, str) or not _PACKAGE_NAME.match(p)]
    if bad:
        raise ConfigError(f"debian image: {bad!r} are not Debian package names; give names "
                          f"like 'curl' or 'nginx-light'")
    return tuple(sorted(set(items)))


def mirror() -> str:
    """The first Debian mirror URI apt is configured with (deb822 or one-line format)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[2]:
                return parts[1] if not parts[1].startswith("[") else parts[2]
    return "http://deb.debian.org/debian"


# ---------------------------------------------------------------- entry point

def ensure(*, packages=(), force: bool = False, progress=None):
    """Return the cached debian image (with extra `packages`), building it first if needed."""
    from . import BuiltImage

    report = progress or (lambda *a: None)
    packages = _check_packages(packages)
    name = image_name(packages)
    key = recipe_key(packages)
    manifest_path = cache.cache_root() / "images" / f"{name}.resolved.json"
    if not force:
        resolved = cache.load_manifest(manifest_path, key)
        if resolved is not None:
            hit = _load_entry(BuiltImage, name, cache.digest_of({"key": key, "debs": resolved}))
            if hit is not None:
                return hit

    t0 = time.monotonic()
    report(f"{name}: resolving the kernel and busybox-static", None, None)
    kernel_pkg, fetched, resolved = debs.fetch_with_kernel(
        KERNEL_META_PACKAGE, INITRD_PACKAGES, cache.debs_dir(),
        progress=lambda m, d, t: report(f"{name}: {m}", d, t))
    digest = cache.digest_of({"key": key, "debs": resolved})
    cache.images_dir()
    cache.save_manifest(manifest_path, key, resolved)
    if not force:
        hit = _load_entry(BuiltImage, name, digest)
        if hit is not None:
            return hit
    with cache.building(name) as tmp:
        meta = _build(tmp, name, packages, fetched, kernel_pkg, digest, key, report)
        cache.publish(tmp, name, digest, replace=force)
    report(f"{name}: built {digest[:12]} in {time.monotonic() - t0:.1f} s (debootstrap "
           f"{meta['debootstrap_s']:.0f} s, disk {meta['disk_bytes'] / 1e6:.0f} MB)", None, None)
    image = _load_entry(BuiltImage, name, digest)
    if image is None:
        raise ImageBuildError(f"{name}: published entry {cache.entry_dir(name, digest)} is unreadable")
    return image






def _load_entry(cls, name: str, digest: str):
    found = cache.read_entry_meta(name, digest)
    if found is None:
        return None
    entry, meta = found
    return cls(name=name, digest=digest, kernel=entry / "vmlinux", initrd=entry / "initrd.cpio",
               kernel_args=meta["kernel_args"], os=meta["os"], memory_mb=meta["memory_mb"],
               disk=entry / "disk.qcow2", ssh_key=entry / "ssh_key", kind=NAME)


# ---------------------------------------------------------------- the build

def debootstrap(rootfs: Path, include: list[str], report, name: str) -> float:
    """debootstrap --variant=minbase SUITE into `rootfs` with `include`; returns its seconds."""
    tool = shutil.which("debootstrap")
    if tool is None:
        raise ImageBuildError("debootstrap not found: it builds the debian image; install it "
                              "with `apt-get install debootstrap` (scripts/setup.sh does)")
    if os.geteuid() != 0:
        raise ImageBuildError("building the debian image needs root (debootstrap chroots into "
                              "the new system); run the build once as root, e.g. "
                              "`sudo -E .venv/bin/vmlab image build debian`")
    debs_cache = cache.debs_dir() / "debootstrap"
    debs_cache.mkdir(exist_ok=True)
    argv = [tool, "--variant=minbase", f"--include={','.join(include)}",
            f"--cache-dir={debs_cache}", SUITE, str(rootfs), mirror()]
    report(f"{name}: debootstrap {SUITE} from {mirror()} (a minute or two)", None, None)
    t0 = time.monotonic()
    # Stream debootstrap's lines as progress: it is the long part of the build.
    # Its own session, so an interrupted build can stop it with the dpkg and chroot children
    # it runs as root (the directory they write into is about to be removed).
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        tail = _follow_debootstrap(proc, name, report)
    except BaseException:
        _stop_session(proc)
        raise
    if proc.wait() != 0:
        log_tail = _tail(rootfs / "debootstrap" / "debootstrap.log", 40)
        raise ImageBuildError(f"{name}: debootstrap failed (exit {proc.returncode}); last lines:\n"
                              + "\n".join(tail)
                              + (f"\ndebootstrap.log (tail):\n{log_tail}" if log_tail else ""))
    return time.monotonic() - t0


def _follow_debootstrap(proc: subprocess.Popen, name: str, report) -> list[str]:
    """Report debootstrap's progress lines until it closes its output; its last 30 lines."""
    tail: list[str] = []
    per_package = ("Retrieving", "Validating", "Extracting", "Unpacking", "Configuring")
    seen = {verb: 0 for verb in per_package}
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-30:]
        if not line.startswith("I: "):
            continue
        verb = line[3:].split(" ", 1)[0]
        if verb in seen:
            # one line per package would be hundreds: say where it is every 25 packages
            seen[verb] += 1
            if seen[verb] % 25 == 1 and verb != "Validating":
                report(f"{name}: {verb.lower()} packages ({seen[verb]} so far)", None, None)
        else:
            report(f"{name}: {line[3:]}", None, None)
    return tail


def _stop_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _configure(rootfs: Path, pubkey: str, os_text: str) -> None:
    etc = rootfs / "etc"
    systemd = etc / "systemd/system"
    for unit in MASKED_UNITS:
        link = systemd / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (etc / "fstab").write_text("# root is mounted by the initramfs\n")
    (etc / "hostname").write_text("vmlab\n")
    (etc / "hosts").write_text("127.0.0.1 localhost vmlab\n")
    # An empty root password: a test VM on a simulated network, reached through the agent.
    shadow = (etc / "shadow").read_text().splitlines()
    (etc / "shadow").write_text("".join(
        (re.sub(r"^root:[^:]*:", "root::", line) if line.startswith("root:") else line) + "\n"
        for line in shadow))
    ssh = rootfs / "root/.ssh"
    ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    (ssh / "authorized_keys").write_text(pubkey)
    (ssh / "authorized_keys").chmod(0o600)
    sbin = rootfs / "usr/local/sbin/vmlab-prep-net"
    sbin.write_text(PREP_NET_SCRIPT)
    sbin.chmod(0o755)
    (systemd / "vmlab-prep-net.service").write_text(PREP_NET_UNIT)
    wants = systemd / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "vmlab-prep-net.service").unlink(missing_ok=True)
    (wants / "vmlab-prep-net.service").symlink_to("/etc/systemd/system/vmlab-prep-net.service")
    (rootfs / "vmlab").mkdir(exist_ok=True)
    (rootfs / "vmlab/os").write_text(os_text + "\n")
    for d in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
              "usr/share/info", "usr/share/locale"):
        target = rootfs / d
        if target.is_dir():
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.name not in ("lock", "partial"):
                    child.unlink()


def _build_initrd(staging: Path, release: str, out: Path) -> list[str]:
    tree = staging.parent / "initrd"
    for d in ("bin", "proc", "sys", "dev", "newroot", "lib/modules"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(staging / "bin/busybox", tree / "bin/busybox")
    (tree / "bin/busybox").chmod(0o755)
    (tree / "init").write_text(INIT_SCRIPT)
    (tree / "init").chmod(0o755)
    moddir = staging / "lib/modules" / release
    index = {p.name[:-3].replace("-", "_"): p for p in moddir.rglob("*.ko")}
    order = module_load_order(index, MODULE_ROOTS)
    for m in order:
        shutil.copyfile(index[m], tree / "lib/modules" / f"{m}.ko")
    (tree / "modules.list").write_text("".join(f"{m}\n" for m in order))
    with open(out, "wb") as f:
        w = write_tree(tree, f)
        w.char_device("dev/console", 5, 1)
        w.close()
    return order


def _build(tmp: Path, name: str, packages: tuple[str, ...], fetched: dict, kernel_pkg: str,
           digest: str, key: str, report) -> dict:
    staging, rootfs, entry = tmp / "staging", tmp / "rootfs", tmp / "entry"
    for d in (staging, entry):
        d.mkdir()
    for deb in fetched.values():
        debs.extract(deb, staging)
    vmlinuz = sorted((staging / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise ImageBuildError(f"{kernel_pkg}: expected one boot/vmlinuz-*, found {vmlinuz}")
    release = vmlinuz[0].name[len("vmlinuz-"):]
    report(f"{name}: kernel {release}: extracting vmlinux, packing the initramfs", None, None)
    (entry / "vmlinux").write_bytes(extract_vmlinux(vmlinuz[0].read_bytes()))
    modules = _build_initrd(staging, release, entry / "initrd.cpio")

    debootstrap_s = debootstrap(rootfs, BASE_PACKAGES + list(packages), report, name)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"vmlab-{name}-{digest[:12]}",
          "-f", str(entry / "ssh_key")], "ssh-keygen")
    installed = run(["chroot", str(rootfs), "dpkg-query", "-W", "-f", "${Package} ${Version}\n"],
                     "listing installed packages")
    pyver = run(["chroot", str(rootfs), "python3", "-c",
                  "import sys; print(sys.version.split()[0])"], "python3 in the image").strip()
    systemd_ver = next((ln.split()[1] for ln in installed.splitlines()
                        if ln.startswith("systemd ")), "?")
    os_text = (f"Debian 12 with systemd {systemd_ver} (kernel {release}, python {pyver})")
    _configure(rootfs, (entry / "ssh_key.pub").read_text(), os_text)

    report(f"{name}: making the ext4 disk", None, None)
    raw = tmp / "disk.raw"
    run(["truncate", "-s", DISK_SIZE, str(raw)], "truncate")
    run(["mkfs.ext4", "-q", "-F", "-L", "root", "-E", "lazy_itable_init=0,lazy_journal_init=0",
          "-d", str(rootfs), str(raw)], "mkfs.ext4")
    run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(entry / "disk.qcow2")],
         "qemu-img convert")
    raw.unlink()
    disk_bytes = (entry / "disk.qcow2").stat().st_size
    meta = {
        "name": name, "digest": digest, "recipe_key": key, "recipe_version": RECIPE_VERSION,
        "kernel_args": KERNEL_ARGS, "os": os_text, "memory_mb": MEMORY_MB,
        "kernel_release": release, "modules": modules, "extra_packages": list(packages),
        "debs": {n: {"version": d.version, "sha256": d.sha256} for n, d in sorted(fetched.items())},
        "installed": dict(ln.split(" ", 1) for ln in installed.splitlines() if " " in ln),
        "debootstrap_s": round(debootstrap_s, 1), "disk_bytes": disk_bytes,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (entry / "image.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return meta
