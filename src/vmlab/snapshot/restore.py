"""Restoring a node from a snapshot: QEMU with the snapshot's device model, RAM mapped
privately from the entry's RAM file, device state loaded with x-ignore-shared, then `cont`.

The caller has already attached vnet to the NIC sockets and set the node's config on its
host channel, so the restored agent finds its address waiting the moment it runs.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from ..errors import VmlabError, VmlabTimeout
from ..vm.qemu import QemuVm
from .cache import SnapshotEntry, SnapshotSpec
from .prepare import make_overlay

__all__ = ["restore", "RestoreFailed", "LOAD_TIMEOUT_S"]

#: Loading the device state takes tens of milliseconds; this only bounds a wedged QEMU.
LOAD_TIMEOUT_S = 30.0


class RestoreFailed(VmlabError):
    """The saved state could not be loaded; `state_broken` tells whether the entry is to blame."""

    def __init__(self, message: str, state_broken: bool):
        super().__init__(message)
        self.state_broken = state_broken


async def restore(spec: SnapshotSpec, entry: SnapshotEntry, *, name: str, run_dir: Path,
                  nic_sockets: list[Path], hostchan: Path) -> QemuVm:
    """Start QEMU, load the snapshot and resume it. On failure QEMU is killed and
    RestoreFailed raised; the caller falls back to a cold boot."""
    disk = None
    if spec.image.disk is not None:
        if entry.disk is None:
            raise RestoreFailed(f"{name}: snapshot {entry.key} has no frozen disk", state_broken=True)
        # The node's own copy-on-write layer on the disk exactly as it was at save time.
        disk = run_dir / "disk.qcow2"
        try:
            await make_overlay(entry.disk, disk)
        except VmlabError as err:
            raise RestoreFailed(f"{name}: {err}", state_broken=False) from err
    cfg = spec.vm_config(name=name, run_dir=run_dir, ram=entry.ram, shared=False, incoming=True,
                         nic_sockets=nic_sockets, hostchan=hostchan, disk=disk)
    vm = QemuVm(cfg)
    try:
        await vm.start()
        await vm.qmp("migrate-set-capabilities",
                     capabilities=[{"capability": "x-ignore-shared", "state": True}])
        await vm.qmp("migrate-incoming", uri=f"exec:cat {entry.state}")
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while True:
            status = (await vm.qmp("query-status")).get("status")
            if status == "paused":
                break  # saved from a stopped VM, so it resumes paused (QEMU keeps the runstate)
            if status not in ("inmigrate", "prelaunch"):
                raise RestoreFailed(f"{name}: unexpected run state {status!r} while loading "
                                    f"snapshot {entry.key}", state_broken=True)
            if time.monotonic() > deadline:
                raise VmlabTimeout(f"{name}: loading snapshot {entry.key} took over "
                                   f"{LOAD_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.005)
        await vm.qmp("cont")
        return vm
    except RestoreFailed:
        await vm.kill()
        raise
    except VmlabError as err:
        # Whatever went wrong (QEMU died loading the state, a QMP error, a wedged load), the
        # node must not fail because of the cache: the caller cold-boots it instead.
        await vm.kill()
        log_tail = vm.qemu_log_tail(10)
        broken = "load of migration failed" in log_tail or "loading state" in log_tail
        raise RestoreFailed(f"{name}: QEMU could not load snapshot {entry.key}: "
                            f"{log_tail.strip() or err}", state_broken=broken) from err
    except BaseException:
        await vm.kill()
        raise
