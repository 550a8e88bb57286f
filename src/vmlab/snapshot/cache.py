"""The snapshot cache: where pre-booted VM states live, and how entries are named, locked,
published, checked and removed.

An entry is a directory `<cache>/snapshots/<key>/` holding `meta.json`, `state` (QEMU's
device state, saved with x-ignore-shared) and `ram` (guest RAM, a memory-backend-file).
The key is ``{image}-{digest[:12]}-v{SNAPSHOT_CODE_VERSION}-{fingerprint[:12]}``: the image's
content, the code that prepares and restores it, and everything that makes a saved state
unrestorable (machine, RAM size, CPU model and accelerator, devices and their order, QEMU
version) — all of it summed up in the fingerprint.

Entries are prepared in a temporary directory and published by an atomic rename, so a
half-written entry is never seen under its key. A per-key file lock makes parallel test
processes prepare an entry once between them. An entry found broken is marked `BAD` and
replaced on the next ensure. Preparing is `snapshot/prepare.py`'s job; restoring,
`snapshot/restore.py`'s.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..images import BuiltImage
from ..images.debian import PREP_MAC
from ..paths import cache_root, ensure_writable_dir
from ..vm.qemu import NicConfig, PrepNic, VmConfig, build_argv
from .provision import Provision

__all__ = ["SNAPSHOT_CODE_VERSION", "SnapshotSpec", "SnapshotEntry", "snapshots_dir",
           "list_entries", "prune", "lock", "snapshot_mac", "SNAPSHOT_KERNEL_ARGS"]

log = logging.getLogger("vmlab.snapshot")

#: Bump when a change to preparing or restoring makes old entries wrong (the agent's wait
#: protocol, the device model, the kernel arguments...). Old entries then become stale.
SNAPSHOT_CODE_VERSION = 1
#: Kernel arguments a snapshot is booted with. Nodes get their own name and addresses through
#: the host channel after the restore, so nothing node-specific may appear here.
SNAPSHOT_KERNEL_ARGS = "vmlab.hostname=vmlab-snapshot vmlab.driver=52.52.0.2:8008"
STATE_FILE, RAM_FILE, META_FILE, BAD_FILE = "state", "ram", "meta.json", "BAD"
#: A disk image's entry also keeps the qcow2 overlay that was live when it was saved, frozen
#: (read-only): a restored guest's page cache matches exactly that disk, so every node gets
#: its own overlay on top of it (measurements-boot-snapshot §5).
DISK_FILE = "disk.qcow2"


def snapshot_mac(nic: int) -> str:
    """The MAC a snapshot's NIC `nic` was saved with; a restored guest keeps it until the agent
    sets the node's own, so restores must use it on QEMU's command line too."""
    return f"52:cc:cc:cc:00:{nic:02x}"


def snapshots_dir() -> Path:
    return ensure_writable_dir(cache_root() / "snapshots")


_qemu_version_cache: dict[str, str] = {}


def qemu_version(qemu: str) -> str:
    if qemu not in _qemu_version_cache:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30)
        _qemu_version_cache[qemu] = out.stdout.splitlines()[0] if out.stdout else "unknown"
    return _qemu_version_cache[qemu]


@dataclass(frozen=True)
class SnapshotSpec:
    """What a snapshot is of: an image booted with `nics` NICs, `memory_mb`, on `accel`,
    and for disk images the provisioning step run before the save, if any."""
    image: BuiltImage
    nics: int
    memory_mb: int
    accel: str
    qemu: str
    provision: Provision | None = None

    @property
    def name(self) -> str:
        """The entry's name prefix: the image, plus `+provision` for a provisioned one (so a
        provisioned entry and the bare one are not each other's stale entries)."""
        return self.image.name + (f"+{self.provision.name}" if self.provision else "")

    def vm_config(self, *, name: str, run_dir: Path, ram: Path, shared: bool,
                  incoming: bool, nic_sockets: list[Path] | None = None,
                  hostchan: Path | None = None, disk: Path | None = None,
                  ssh_port: int | None = None) -> VmConfig:
        """The one QEMU configuration both preparing and restoring use; only paths, the
        shared/incoming flags and the prep NIC's backend (`ssh_port`, preparation only)
        differ, which QEMU allows. Disk images need `disk`: the overlay to run on."""
        sockets = nic_sockets or [run_dir / f"nic{i}.sock" for i in range(self.nics)]
        on_disk = self.image.disk is not None
        if on_disk and disk is None:
            raise ValueError(f"{self.image.name} boots from a disk: pass disk= (an overlay)")
        return VmConfig(name=name, run_dir=run_dir, kernel=self.image.kernel,
                        initrd=self.image.initrd, kernel_args=self.image.kernel_args,
                        # an image without a kernel of ours (cloud) boots its own bootloader
                        extra_kernel_args=SNAPSHOT_KERNEL_ARGS if self.image.kernel else "",
                        memory_mb=self.memory_mb,
                        nics=tuple(NicConfig(snapshot_mac(i), sockets[i]) for i in range(self.nics)),
                        accel=self.accel, memory_file=ram, memory_shared=shared,
                        hostchan_socket=hostchan or run_dir / "hostchan.sock", incoming=incoming,
                        disk=disk if on_disk else None, seed=self.image.seed,
                        prep_nic=PrepNic(PREP_MAC, ssh_port, outside=bool(
                            self.provision and self.provision.network)) if on_disk else None)

    def fingerprint_inputs(self) -> dict:
        # The device model is read off the real command line, with every path replaced by a
        # placeholder: a device added to build_argv changes the fingerprint by itself.
        probe = self.vm_config(name="snapshot", run_dir=Path("/RUN"), ram=Path("/RAM"),
                               shared=False, incoming=False, disk=Path("/DISK"))
        argv = build_argv(probe, qemu="qemu")
        if self.image.kernel is not None:
            argv = [a.replace(str(self.image.kernel), "/KERNEL") for a in argv]
        if self.image.initrd is not None:
            argv = [a.replace(str(self.image.initrd), "/INITRD") for a in argv]
        if self.image.seed is not None:
            argv = [a.replace(str(self.image.seed), "/SEED") for a in argv]
        inputs = {"argv": argv, "qemu_version": qemu_version(self.qemu),
                  "image_digest": self.image.digest, "code_version": SNAPSHOT_CODE_VERSION}
        if self.provision is not None:
            inputs["provision"] = {"name": self.provision.name, "digest": self.provision.digest}
        if self.image.disk is not None:
            # A disk image gets its agent installed while the snapshot is prepared (the
            # appliance's is part of its image digest): a changed agent must make a new entry.
            from .prepare import agent_files
            files = agent_files(self.image)
            inputs["agent_files"] = {path: hashlib.sha256(data).hexdigest()
                                     for path, (data, _mode) in sorted(files.items())}
        return inputs

    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_inputs(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def key(self) -> str:
        return (f"{self.name}-{self.image.digest[:12]}-v{SNAPSHOT_CODE_VERSION}-"
                f"{self.fingerprint()[:12]}")


@dataclass(frozen=True)
class SnapshotEntry:
    path: Path

    @property
    def key(self) -> str:
        return self.path.name

    @property
    def state(self) -> Path:
        return self.path / STATE_FILE

    @property
    def ram(self) -> Path:
        return self.path / RAM_FILE

    @property
    def disk(self) -> Path | None:
        """The frozen disk overlay (disk images), else None."""
        path = self.path / DISK_FILE
        return path if path.exists() else None

    def meta(self) -> dict:
        return json.loads((self.path / META_FILE).read_text())

    def problem(self) -> str | None:
        """Why this entry cannot serve a restore, or None if it looks whole. Cheap: the state
        file is small (device state only) and is checksummed; the RAM file is size-checked."""
        bad = self.path / BAD_FILE
        if bad.exists():
            return f"marked bad: {bad.read_text().strip()}"
        try:
            meta = self.meta()
        except (OSError, ValueError) as err:
            return f"unreadable {META_FILE}: {err}"
        try:
            digest = hashlib.sha256(self.state.read_bytes()).hexdigest()
        except OSError as err:
            return f"unreadable state file: {err}"
        if digest != meta.get("state_sha256"):
            return "state file does not match its checksum (truncated or corrupted)"
        try:
            size = self.ram.stat().st_size
        except OSError as err:
            return f"missing RAM file: {err}"
        if size != meta.get("ram_bytes"):
            return f"RAM file is {size} bytes, expected {meta.get('ram_bytes')}"
        if meta.get("disk") and self.disk is None:
            return f"missing its frozen disk {DISK_FILE}"
        return None

    def marked_bad(self) -> bool:
        return (self.path / BAD_FILE).exists()

    def mark_bad(self, reason: str) -> None:
        try:
            (self.path / BAD_FILE).write_text(reason + "\n")
        except OSError as err:
            log.warning("could not mark snapshot %s bad: %s", self.key, err)


class lock:
    """An exclusive per-key file lock across processes (flock), as a context manager."""

    def __init__(self, key: str):
        locks = snapshots_dir() / ".locks"
        locks.mkdir(exist_ok=True)
        self.path = locks / f"{key}.lock"
        self._fd: int | None = None

    def __enter__(self) -> "lock":
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def find(key: str) -> SnapshotEntry | None:
    path = snapshots_dir() / key
    return SnapshotEntry(path) if (path / META_FILE).exists() else None


def publish(tmp: Path, key: str) -> SnapshotEntry:
    """Atomically make the finished directory `tmp` the entry for `key`."""
    final = snapshots_dir() / key
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    return SnapshotEntry(final)


def new_tmp_dir(key: str) -> Path:
    tmp = snapshots_dir() / f".tmp-{key}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    return tmp


_KEY = re.compile(r"^(?P<name>.+)-[0-9a-f]{12}-v\d+-[0-9a-f]{12}$")


def entry_name(key: str) -> str | None:
    """The spec name an entry key was made from (`SnapshotSpec.key`), or None."""
    match = _KEY.match(key)
    return match["name"] if match else None


def remove_stale(spec: SnapshotSpec, keep_key: str) -> list[str]:
    """Remove the entries `spec`'s entry supersedes, and leftover temporary directories of
    dead preparations. An entry is superseded when it is of the same spec name with the same
    shape (NICs, RAM, accelerator) and another key: an older image digest, code version,
    QEMU or device model. Entries of another shape are siblings in use by other nodes of
    the same image, and stay."""
    shape = {"nics": spec.nics, "memory_mb": spec.memory_mb, "accel": spec.accel}
    removed = []
    root = snapshots_dir()
    for path in root.iterdir():
        name = path.name
        if not path.is_dir():
            continue
        if name.startswith(".tmp-"):
            try:
                pid = int(name.rsplit("-", 2)[-2])
            except ValueError:
                continue
            if not _pid_alive(pid):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
            continue
        if name == keep_key or entry_name(name) != spec.name:
            continue
        try:
            meta = SnapshotEntry(path).meta()
        except (OSError, ValueError):
            meta = None  # unreadable: of no use to anyone
        if meta is None or all(meta.get(k) == v for k, v in shape.items()):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def remove_built_on(image_name: str, image_digest: str) -> list[str]:
    """Remove every entry made on the image `image_name` with `image_digest` (a forced
    rebuild replaced it with other bytes under the same digest)."""
    removed = []
    for entry, meta, _problem in list_entries():
        if meta.get("image") == image_name and meta.get("image_digest") == image_digest:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.key)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_entries() -> list[tuple[SnapshotEntry, dict, str | None]]:
    """Every entry with its metadata and its problem (None when usable)."""
    out = []
    for path in sorted(snapshots_dir().iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        entry = SnapshotEntry(path)
        try:
            meta = entry.meta()
        except (OSError, ValueError):
            meta = {}
        out.append((entry, meta, entry.problem()))
    return out


def prune(*, all_entries: bool = False) -> list[str]:
    """Remove broken entries and leftovers (or everything with `all_entries`)."""
    removed = []
    for path in sorted(snapshots_dir().iterdir()):
        if path.name == ".locks":
            continue
        if path.name.startswith(".tmp-"):
            if all_entries or not _pid_alive(int(path.name.rsplit("-", 2)[-2])):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
            continue
        if all_entries or SnapshotEntry(path).problem() is not None:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed
