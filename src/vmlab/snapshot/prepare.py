"""Preparing a snapshot: boot an image once, let its agent come up and wait, save the VM.

The image boots with the exact device model restores will use (see `SnapshotSpec.vm_config`),
guest RAM in a shared file, and a host channel that answers "wait". Once the agent has
polled twice (it is up and idle in its wait loop), the NIC links go down, the VM stops, and
QEMU saves its device state with x-ignore-shared (the RAM file already holds the memory).
Everything is written into a temporary directory that `cache.publish` renames into place.

Disk images (`debian`, `cloud`) take the reference's route (tailscale-vmtest.md §5.2): the
image boots on a fresh qcow2 overlay with an extra NIC on QEMU user networking whose port 22
is forwarded to the host; vmlab logs in over SSH with the image's key, runs the provisioning
step if the node has one, copies the agent in and installs it as a systemd unit (started at
boot, restarted on failure), waits until it polls the host channel, takes the prep NIC's
address away and its link down, and saves. The overlay is then frozen (read-only) into the
entry: restored nodes each get their own overlay on top of it.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from ..errors import NodeCrashed, VmlabError, VmlabTimeout
from ..hostchan import HostChannel
from ..vm.qemu import QemuVm
from ..vm.ssh import SshTarget, tar_bytes
from .cache import DISK_FILE, META_FILE, RAM_FILE, STATE_FILE, SnapshotSpec

__all__ = ["prepare", "PREPARE_TIMEOUT_S"]

log = logging.getLogger("vmlab.snapshot.prepare")

#: Budget for booting the image until its agent waits on the host channel.
PREPARE_TIMEOUT_S = 180.0
#: Budget for QEMU to write the device state (tens of KB; it is quick).
SAVE_TIMEOUT_S = 60.0


async def prepare(spec: SnapshotSpec, out_dir: Path,
                  progress: Callable[[str], None]) -> dict:
    """Boot, wait, save into `out_dir` (STATE_FILE, RAM_FILE, META_FILE). Returns the meta."""
    t0 = time.monotonic()
    # Sockets live in a short /tmp directory: unix socket paths are limited to 107 bytes.
    run_dir = Path(tempfile.mkdtemp(prefix="vmlab-prep-"))
    disk = ssh_port = None
    ssh_s = None
    if spec.image.disk is not None:
        disk = out_dir / DISK_FILE
        await make_overlay(spec.image.disk, disk)
        ssh_port = free_port()

    def new_vm() -> QemuVm:
        return QemuVm(spec.vm_config(name=f"prepare-{spec.image.name}", run_dir=run_dir,
                                     ram=out_dir / RAM_FILE, shared=True, incoming=False,
                                     disk=disk, ssh_port=ssh_port))

    vm = new_vm()
    # The socket path does not depend on the port: a retried start keeps this channel.
    chan = HostChannel(f"prepare-{spec.image.name}", vm.cfg.hostchan_socket)
    try:
        progress(f"snapshot {spec.image.name}: booting the image ({spec.accel}, "
                 f"{spec.memory_mb} MB, {spec.nics} NIC{'s' if spec.nics != 1 else ''})")
        for attempt in range(3):
            try:
                await vm.start()
                break
            except NodeCrashed as err:
                # free_port() only says the port was free a moment ago: another process
                # may have bound it before QEMU did. Take another one.
                if ssh_port is None or "host forwarding rule" not in str(err) or attempt == 2:
                    raise
                await vm.kill()
                ssh_port = free_port()
                log.info("snapshot %s: SSH forward port taken meanwhile; trying port %d",
                         spec.name, ssh_port)
                vm = new_vm()
        chan.start()
        if disk is not None:
            ssh = SshTarget(ssh_port, spec.image.ssh_key)
            ssh_s = await _until(ssh.wait_up(PREPARE_TIMEOUT_S, what=f"snapshot {spec.name}"),
                                 vm, PREPARE_TIMEOUT_S + 30, "SSH did not come up")
            progress(f"snapshot {spec.name}: SSH up after {time.monotonic() - t0:.1f} s")
            budget = (PREPARE_TIMEOUT_S * (2 if spec.image.seed is not None else 1)
                      + (spec.provision.timeout_s if spec.provision else 0))
            await _until(install_over_ssh(spec, ssh, progress), vm, budget,
                         "provisioning and installing the agent did not finish")
        await _until(chan.wait_polled(2), vm, PREPARE_TIMEOUT_S,
                     "the agent did not start waiting on the host channel")
        booted = time.monotonic() - t0
        progress(f"snapshot {spec.image.name}: agent up and waiting after {booted:.1f} s; saving")
        if disk is not None:
            await _detach_prep_nic(ssh, vm)
        for i in range(spec.nics):
            await vm.set_link(i, False)
        # One more poll after the links went down: the agent is idle in its wait loop.
        await _until(chan.wait_polled(chan.polls + 1), vm, 30, "the agent stopped polling")
        await vm.qmp("migrate-set-capabilities",
                     capabilities=[{"capability": "x-ignore-shared", "state": True}])
        await vm.qmp("stop")
        state = out_dir / STATE_FILE
        await vm.qmp("migrate", uri=f"exec:cat > {state}")
        deadline = time.monotonic() + SAVE_TIMEOUT_S
        while True:
            info = await vm.qmp("query-migrate")
            status = info.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise VmlabError(f"snapshot {spec.image.name}: saving failed: "
                                 f"{info.get('error-desc', status)}")
            if time.monotonic() > deadline:
                raise VmlabTimeout(f"snapshot {spec.image.name}: saving did not finish in "
                                   f"{SAVE_TIMEOUT_S:.0f} s (last status {status})")
            await asyncio.sleep(0.01)
        console_tail = vm.console_tail(20)
    finally:
        await chan.close()
        await vm.kill()
        shutil.rmtree(run_dir, ignore_errors=True)
    data = state.read_bytes()
    if disk is not None:
        disk.chmod(0o444)  # frozen: the saved guest's page cache matches exactly this disk
    ram = out_dir / RAM_FILE
    meta = {
        "key": spec.key,
        "image": spec.image.name,
        "image_digest": spec.image.digest,
        "os": spec.image.os,
        "fingerprint": spec.fingerprint(),
        "fingerprint_inputs": spec.fingerprint_inputs(),
        "memory_mb": spec.memory_mb,
        "nics": spec.nics,
        "accel": spec.accel,
        "state_bytes": len(data),
        "state_sha256": hashlib.sha256(data).hexdigest(),
        "ram_bytes": ram.stat().st_size,
        "ram_used_bytes": ram.stat().st_blocks * 512,
        "created": time.time(),
        "prepare_s": round(time.monotonic() - t0, 2),
        "boot_to_wait_s": round(booted, 2),
        "disk": disk is not None,
        "ssh_up_s": round(ssh_s, 2) if ssh_s is not None else None,
        "provision": ({"name": spec.provision.name, "digest": spec.provision.digest}
                      if spec.provision else None),
        "console_tail": console_tail,
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1))
    progress(f"snapshot {spec.image.name}: saved in {meta['prepare_s']:.1f} s "
             f"(device state {len(data) // 1024} KB, RAM {meta['ram_used_bytes'] >> 20} MB used)")
    return meta


async def _until(awaitable, vm: QemuVm, timeout_s: float, what: str):
    """Await `awaitable`, failing fast if QEMU exits, with the console tail on failure."""
    try:
        finished, result = await vm.until(awaitable, timeout_s)
    except asyncio.TimeoutError:
        tail = vm.console_tail(25)
        raise VmlabTimeout(f"snapshot preparation: {what} within {timeout_s:.0f} s; console "
                           f"tail:\n{tail}", last=tail) from None
    if not finished:
        raise NodeCrashed(f"snapshot preparation: QEMU exited (code {vm.returncode}): {what}; "
                          f"console tail:\n{vm.console_tail(25)}")
    return result


# ---------------------------------------------------------------- disk images

#: The agent's systemd unit. StandardOutput to the serial port: journald is masked in the
#: debian image, and the console is where vmlab reads agent lines. StartLimitIntervalSec=0:
#: never stop restarting it, a test VM without its agent is useless.
AGENT_UNIT = """[Unit]
Description=vmlab agent (host channel, then dials the test driver)
After=local-fs.target
StartLimitIntervalSec=0

[Service]
ExecStart=/usr/bin/python3 -u /vmlab/agent.py
Restart=always
RestartSec=0.5
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/ttyS0
TTYReset=no
TTYVHangup=no

[Install]
WantedBy=multi-user.target
"""


def agent_files(image=None) -> dict[str, tuple[bytes, int]]:
    """What install_over_ssh puts in `image`: the agent, its DHCP hook, its unit, and the
    image's `agent_busybox` if it has one."""
    from ..images.appliance import agent_sources
    src = agent_sources()
    files = {"/vmlab/agent.py": (src["agent.py"], 0o644),
             "/vmlab/udhcpc.sh": (src["udhcpc.sh"], 0o755),
             "/etc/systemd/system/vmlab-agent.service": (AGENT_UNIT.encode(), 0o644)}
    if image is not None and image.agent_busybox is not None:
        files["/vmlab/bin/busybox"] = (image.agent_busybox.read_bytes(), 0o755)
    return files


def _prep_dev_script(body: str) -> str:
    """A guest shell loop running `body` with $dev set to the prep NIC's name (found by MAC:
    names differ between images). No single quotes: callers wrap it in sh -c '...'."""
    from ..images.debian import PREP_MAC
    return (f'for d in /sys/class/net/*; do [ "$(cat $d/address)" = {PREP_MAC} ] || continue; '
            f'dev=${{d##*/}}; {body}; done')


#: For a `Provision(network=True)` step: a default route and a resolver through QEMU's NAT
#: on the prep NIC (restrict=off), the guest's own resolv.conf (maybe a symlink) set aside.
_OUTSIDE_ON = _prep_dev_script(
    "ip route replace default via 10.0.2.2 dev $dev") + (
    " && { [ ! -e /etc/resolv.conf ] && [ ! -L /etc/resolv.conf ] || "
    "mv /etc/resolv.conf /run/vmlab-resolv.conf.saved; } "
    "&& echo 'nameserver 10.0.2.3' > /etc/resolv.conf")
#: ...and both taken away again, so no restored clone keeps them.
_OUTSIDE_OFF = _prep_dev_script(
    "ip route del default via 10.0.2.2 dev $dev 2>/dev/null || true") + (
    " ; rm -f /etc/resolv.conf; if [ -e /run/vmlab-resolv.conf.saved ] || "
    "[ -L /run/vmlab-resolv.conf.saved ]; then mv /run/vmlab-resolv.conf.saved "
    "/etc/resolv.conf; fi")


async def install_over_ssh(spec: SnapshotSpec, ssh: SshTarget,
                           progress: Callable[[str], None]) -> None:
    """Provision (files, then commands), then install and start the agent's unit."""
    what = f"snapshot {spec.name}"
    if spec.image.seed is not None:
        # A cloud image: cloud-init may still be applying the seed (host keys, users, its
        # final stage) when SSH comes up; a snapshot taken mid-way would finish it in every
        # clone. `status --wait` exits non-zero when a module failed: that is logged, not fatal.
        t0 = time.monotonic()
        progress(f"{what}: waiting for cloud-init to finish")
        out = await ssh.check("cloud-init status --wait --long >/tmp/vmlab-cloud-init.status "
                              "2>&1; cat /tmp/vmlab-cloud-init.status",
                              timeout_s=PREPARE_TIMEOUT_S, what=f"{what}: cloud-init")
        status = next((ln.split(":", 1)[1].strip() for ln in str(out).splitlines()
                       if ln.startswith("status:")), "unknown")
        progress(f"{what}: cloud-init {status} after {time.monotonic() - t0:.1f} s more")
        if status != "done":
            log.warning("%s: cloud-init ended with status %s:\n%s", what, status, out)
    prov = spec.provision
    if prov is not None:
        t0 = time.monotonic()
        files = prov.guest_files()
        if files:
            await ssh.put_tar(tar_bytes(files), what=f"{what}: provision {prov.name}")
        if prov.network:
            await ssh.check(_OUTSIDE_ON, what=f"{what}: provision {prov.name}: network")
        for i, cmd in enumerate(prov.commands):
            progress(f"{what}: provision {prov.name} ({i + 1}/{len(prov.commands)}): {cmd[:80]}")
            await ssh.check(cmd, timeout_s=prov.timeout_s, what=f"{what}: provision {prov.name}")
        if prov.network:
            await ssh.check(_OUTSIDE_OFF, what=f"{what}: provision {prov.name}: network")
        progress(f"{what}: provisioned in {time.monotonic() - t0:.1f} s")
    # One SSH session: each costs seconds of key exchange in a TCG guest. `enable` reloads
    # systemd's unit files by itself.
    await ssh.check("tar -x -C / -f - && systemctl enable vmlab-agent.service "
                    "&& systemctl start --no-block vmlab-agent.service",
                    stdin=tar_bytes(agent_files(spec.image)), what=f"{what}: installing the agent")
    progress(f"{what}: agent installed as vmlab-agent.service")


#: Seconds the guest waits before dropping the prep NIC's address, so the SSH session that
#: asked for it can end cleanly first.
_PREP_DETACH_DELAY_S = 1


async def _detach_prep_nic(ssh: SshTarget, vm: QemuVm) -> None:
    """Flush the guest's page cache to disk (smaller RAM file, and the frozen disk then holds
    every write), take the prep NIC's address away (a restored node's LAN may be 10.0.2.0/24
    too), and pull its cable for good: the restored device keeps the link down."""
    script = f"sleep {_PREP_DETACH_DELAY_S}; " + _prep_dev_script(
        "ip addr flush dev $dev && ip link set dev $dev down")
    await ssh.check(f"sync && echo 3 > /proc/sys/vm/drop_caches && "
                    f"setsid -f sh -c '{script}' </dev/null >/dev/null 2>&1",
                    what="detaching the prep NIC")
    await asyncio.sleep(_PREP_DETACH_DELAY_S + 1.0)  # the guest's own delay, plus slack
    await vm.qmp("set_link", name="prep", up=False)


async def make_overlay(backing: Path, overlay: Path) -> None:
    """`qemu-img create -f qcow2 -b backing -F qcow2 overlay` (tens of milliseconds)."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "qcow2",
        str(overlay), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise VmlabError(f"qemu-img create overlay {overlay} on {backing} failed: "
                         f"{out.decode(errors='replace').strip()}; is qemu-utils installed?")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (QEMU binds it for the prep NIC)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
