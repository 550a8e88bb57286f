"""One QEMU process per node: its command line, its lifetime, and QMP.

`build_argv(cfg)` turns a `VmConfig` into QEMU's argv (pure, testable without QEMU). `QemuVm`
starts that process through `vm/process.py` (own process group, parent-death signal), connects
QMP with `qemu.qmp.QMPClient`, and notices the moment QEMU exits. Choosing the accelerator is
`vm/accel.py`'s job; booting images, snapshots and agents belong to other layers.

Layout of a node's `run_dir`:

    qmp.sock      QMP server socket (QEMU listens; we connect)
    console.log   the guest's serial console (written by QEMU itself, so it survives our death)
    qemu.log      QEMU's own stdout and stderr

Unix socket paths are limited to 107 bytes (sun_path is 108 including the NUL). `build_argv`
raises `ConfigError` for a longer one; keep run dirs short (e.g. under the cache root or /tmp,
not under a deep pytest tmp_path).

Threading: a `QemuVm` lives on one asyncio loop. Call `start()` from a loop whose thread lives at
least as long as the VM (the Env's loop thread): QEMU's parent-death signal fires when the thread
that spawned it exits (see vm/process.py).
"""
from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from ..errors import ConfigError, NodeCrashed, StateError, VmlabError, VmlabTimeout
from . import process
from .accel import qemu_binary

__all__ = ["NicConfig", "PrepNic", "VmConfig", "QemuVm", "VmState", "build_argv", "UNIX_PATH_MAX"]

#: Longest usable unix socket path in bytes (sun_path[108] minus the terminating NUL).
UNIX_PATH_MAX = 107
QMP_SOCKET = "qmp.sock"
CONSOLE_LOG = "console.log"
QEMU_LOG = "qemu.log"


@dataclass(frozen=True)
class NicConfig:
    """One virtio-net NIC whose netdev is a unix stream socket that QEMU listens on.

    vnet connects to `socket_path` (QEMU 7.2's stream client never reconnects, so QEMU must be
    the server). Frames on it are preceded by a 4-byte big-endian length.

    With `dgram_peer` set, the netdev is `dgram` instead: QEMU binds `socket_path` and sends
    each frame as one datagram to `dgram_peer`, vnet's own bound socket (which must exist
    before QEMU sends; vnet binds it first).
    """
    mac: str
    socket_path: Path
    dgram_peer: Path | None = None


@dataclass(frozen=True)
class PrepNic:
    """The NIC a disk image is prepared through: QEMU user networking (`restrict=on`: the
    guest reaches nothing) with host port `ssh_port` forwarded to the guest's port 22.

    `ssh_port=None` is the form a restore uses: the same virtio-net device on the same kind
    of netdev, minus the port forward. The device stays because a saved state needs the
    device model it was saved with, and with `acpi=off` the guest cannot take a PCI
    hot-unplug before the save; the user netdev stays because QEMU saves its (slirp) state
    and refuses a stream with a section nothing claims ("Unknown savevm section 'slirp'").
    With `restrict=on` and no forward nothing reaches it; preparation also turns its link
    off before saving, and the restored device keeps that.

    `outside=True` (preparation only, for a provisioning step that asks for the network)
    lifts `restrict`: the guest then reaches what the host reaches, through QEMU's NAT
    (gateway 10.0.2.2, DNS 10.0.2.3). Restores never get it."""
    mac: str
    ssh_port: int | None = None
    outside: bool = False


@dataclass(frozen=True, kw_only=True)
class VmConfig:
    """Everything needed to start one node's QEMU. Keyword-only.

    name: node name, used in logs and QEMU's `-name`.
    kernel: PVH-capable `vmlinux` (uncompressed ELF) for `-kernel`; None boots QEMU's firmware
        (or `bios`) with no kernel, which only tests and probes want.
    initrd: initramfs for `-initrd`; requires `kernel`.
    kernel_args, extra_kernel_args: joined with a space for `-append`.
    memory_mb, cpus: `-m` and `-smp`.
    nics: in order; NIC i is `-device virtio-net-pci,id=nic{i}` on netdev `net{i}`.
    run_dir: per-node directory for qmp.sock, console.log and qemu.log; created if missing.
    accel: "tcg" or "kvm" (see vm.accel.choose_accel).
    bios: optional firmware image for `-bios`.
    start_paused: pass `-S` (vCPUs stopped until QMP `cont`), e.g. for restores.
    extra_args: appended verbatim, for layers that add devices (e.g. `-incoming`).
    """
    name: str
    run_dir: Path
    kernel: Path | None = None
    initrd: Path | None = None
    kernel_args: str = ""
    memory_mb: int = 256
    cpus: int = 1
    nics: tuple[NicConfig, ...] = ()
    accel: str = "tcg"
    extra_kernel_args: str = ""
    bios: Path | None = None
    start_paused: bool = False
    extra_args: tuple[str, ...] = ()
    #: guest RAM in this file (memory-backend-file) instead of anonymous memory: shared while a
    #: snapshot is prepared (the guest writes the file), private when restoring clones (each
    #: maps it copy-on-write, so the file stays intact and clean pages are shared)
    memory_file: Path | None = None
    memory_shared: bool = False
    #: the host channel: a virtio-serial port named `vmlab.hostchan` whose chardev is a unix
    #: socket QEMU listens on
    hostchan_socket: Path | None = None
    #: `-incoming defer`: wait for QMP migrate-incoming (a snapshot restore)
    incoming: bool = False
    #: a VGA display (`-vga std`) the dashboard takes screendumps of, with the kernel printing
    #: on it too (`console=tty0`); part of the device model, so snapshots depend on it
    vga: bool = True
    #: the root disk (qcow2), as `-drive if=none,id=disk0,...,cache=unsafe` on a
    #: virtio-blk-pci device; cache=unsafe because a test disk is thrown away (QEMU still
    #: flushes it when a snapshot is saved)
    disk: Path | None = None
    #: a read-only second disk (cloud-init's NoCloud seed, raw ISO)
    seed: Path | None = None
    #: the snapshot-preparation NIC (`PrepNic`), after every vnet NIC so the guest numbers it last
    prep_nic: "PrepNic | None" = None

    @property
    def qmp_path(self) -> Path:
        return self.run_dir / QMP_SOCKET

    @property
    def console_path(self) -> Path:
        return self.run_dir / CONSOLE_LOG

    @property
    def log_path(self) -> Path:
        return self.run_dir / QEMU_LOG


def _check_socket_path(path: Path, what: str, node: str) -> None:
    n = len(os.fsencode(path))
    if n > UNIX_PATH_MAX:
        raise ConfigError(f"node {node!r}: {what} path {str(path)!r} is {n} bytes; unix sockets "
                          f"allow at most {UNIX_PATH_MAX}; use a shorter run_dir or socket "
                          f"directory (e.g. under /tmp)")


def _validate(cfg: VmConfig) -> None:
    problems = []
    if not cfg.name or any(c in cfg.name for c in ",= /\n"):
        problems.append(f"name {cfg.name!r} must be non-empty without ',', '=', '/' or spaces")
    if cfg.accel not in ("tcg", "kvm"):
        problems.append(f"accel {cfg.accel!r} is not 'tcg' or 'kvm'")
    if cfg.memory_mb < 16:
        problems.append(f"memory_mb={cfg.memory_mb} is below 16")
    if cfg.cpus < 1:
        problems.append(f"cpus={cfg.cpus} is below 1")
    if cfg.kernel is None and (cfg.initrd is not None or cfg.kernel_args or cfg.extra_kernel_args):
        problems.append("initrd or kernel args given without a kernel; set kernel")
    for i, nic in enumerate(cfg.nics):
        parts = nic.mac.split(":")
        if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p)
                                      for p in parts):
            problems.append(f"nics[{i}].mac {nic.mac!r} is not like 52:cc:cc:cc:cc:01")
        elif int(parts[0], 16) & 1:
            problems.append(f"nics[{i}].mac {nic.mac!r} is a multicast address; "
                            f"the first byte must be even")
        if "," in str(nic.socket_path) or "," in str(nic.dgram_peer or ""):
            problems.append(f"nics[{i}] socket paths must not contain ','")
    if "," in str(cfg.run_dir):
        problems.append(f"run_dir {str(cfg.run_dir)!r} must not contain ',' (QEMU option syntax)")
    for what, path in (("disk", cfg.disk), ("seed", cfg.seed)):
        if path is not None and "," in str(path):
            problems.append(f"{what} path {str(path)!r} must not contain ',' (QEMU option syntax)")
    if problems:
        raise ConfigError(f"node {cfg.name!r}: " + "; ".join(problems))
    _check_socket_path(cfg.qmp_path, "QMP socket", cfg.name)
    for i, nic in enumerate(cfg.nics):
        _check_socket_path(nic.socket_path, f"nics[{i}] socket", cfg.name)
        if nic.dgram_peer is not None:
            _check_socket_path(nic.dgram_peer, f"nics[{i}] dgram peer socket", cfg.name)
    if cfg.hostchan_socket is not None:
        _check_socket_path(cfg.hostchan_socket, "host channel socket", cfg.name)


def build_argv(cfg: VmConfig, qemu: str = "qemu-system-x86_64") -> list[str]:
    """QEMU's argv for `cfg`. Pure: touches no file. Raises ConfigError for an invalid cfg.

    Example (2 NICs)::

        build_argv(VmConfig(name="alice", run_dir=Path("/tmp/r/alice"), kernel=Path("vmlinux"),
                            initrd=Path("a.cpio"), kernel_args="console=ttyS0",
                            nics=(NicConfig("52:cc:cc:cc:cc:01", Path("/tmp/r/alice/n0.sock")),)))
    """
    _validate(cfg)
    argv = [
        qemu,
        "-name", cfg.name,
        "-machine", "pc",
        "-accel", cfg.accel,
    ]
    if cfg.accel == "kvm":
        argv += ["-cpu", "host"]
    # TCG: QEMU's default CPU model. `-cpu max` gave no boot-time gain here
    # (reference/measurements-boot-snapshot.md §2) and would tie snapshots to this QEMU build.
    if cfg.memory_file is not None:
        argv += ["-object", f"memory-backend-file,id=ram0,size={cfg.memory_mb}M,"
                            f"mem-path={cfg.memory_file},share={'on' if cfg.memory_shared else 'off'}",
                 "-machine", "memory-backend=ram0"]
    argv += [
        "-m", str(cfg.memory_mb),
        "-smp", str(cfg.cpus),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        # -vga std: the Debian cloud kernel has no DRM, so only VGA text mode shows its
        # console (reference/measurements-net-channels.md §4); screendump reads it over QMP.
        *(["-vga", "std"] if cfg.vga else []),
        "-no-reboot",
        # The console goes straight to a file from QEMU, so it is captured even if we die.
        "-chardev", f"file,id=console,path={cfg.console_path}",
        "-serial", "chardev:console",
        "-qmp", f"unix:{cfg.qmp_path},server=on,wait=off",
    ]
    if cfg.bios is not None:
        argv += ["-bios", str(cfg.bios)]
    if cfg.kernel is not None:
        argv += ["-kernel", str(cfg.kernel)]
        if cfg.initrd is not None:
            argv += ["-initrd", str(cfg.initrd)]
        append = " ".join(a for a in (cfg.kernel_args.strip(), cfg.extra_kernel_args.strip()) if a)
        if cfg.vga and "console=ttyS0" in append.split():
            # The kernel prints on every console= but /dev/console is the LAST one: tty0 goes
            # first so the serial port (console.log) keeps getting everything. A PVH-booted
            # kernel has no screen_info and so no VGA console: there the appliance's
            # agent/screen.py draws the console instead, and tty0 is a harmless no-op.
            append = "console=tty0 " + append
        if append:
            argv += ["-append", append]
    for i, nic in enumerate(cfg.nics):
        if nic.dgram_peer is not None:
            netdev = (f"dgram,id=net{i},local.type=unix,local.path={nic.socket_path},"
                      f"remote.type=unix,remote.path={nic.dgram_peer}")
        else:
            netdev = f"stream,id=net{i},server=on,addr.type=unix,addr.path={nic.socket_path}"
        argv += [
            "-netdev", netdev,
            # romfile= : no option ROM; we never PXE boot, and it saves loading efi-virtio.rom.
            "-device", f"virtio-net-pci,netdev=net{i},id=nic{i},mac={nic.mac},romfile=",
        ]
    if cfg.hostchan_socket is not None:
        argv += [
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=hostchan,path={cfg.hostchan_socket},server=on,wait=off",
            "-device", "virtserialport,bus=vser0.0,chardev=hostchan,name=vmlab.hostchan",
        ]
    if cfg.disk is not None:
        argv += ["-drive", f"if=none,id=disk0,file={cfg.disk},format=qcow2,cache=unsafe",
                 "-device", "virtio-blk-pci,drive=disk0,id=vda"]
    if cfg.seed is not None:
        argv += ["-drive", f"if=none,id=seed0,file={cfg.seed},format=raw,readonly=on",
                 "-device", "virtio-blk-pci,drive=seed0,id=vdb"]
    if cfg.prep_nic is not None:
        forward = (f",hostfwd=tcp:127.0.0.1:{cfg.prep_nic.ssh_port}-:22"
                   if cfg.prep_nic.ssh_port is not None else "")
        restrict = "off" if cfg.prep_nic.outside and cfg.prep_nic.ssh_port is not None else "on"
        argv += ["-netdev", f"user,id=prep,restrict={restrict}{forward}",
                 "-device", f"virtio-net-pci,netdev=prep,id=prepnic,mac={cfg.prep_nic.mac},romfile="]
    if cfg.incoming:
        argv += ["-incoming", "defer"]
    if cfg.start_paused:
        argv.append("-S")
    argv += list(cfg.extra_args)
    return argv


def _tail(path: Path, n_lines: int, max_bytes: int = 64 * 1024) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    lines = data.decode(errors="replace").splitlines()
    return "\n".join(lines[-n_lines:]) if n_lines > 0 else ""


class VmState(str, enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"    # QEMU process alive and QMP connected
    EXITED = "exited"      # QEMU exited by itself (guest poweroff, crash)
    KILLED = "killed"      # we killed it


class QemuVm:
    """A QEMU process for one node, driven over QMP on the caller's event loop.

    Example::

        vm = QemuVm(VmConfig(name="alice", run_dir=run, kernel=vmlinux, initrd=cpio,
                             kernel_args="console=ttyS0", accel=choose_accel().name))
        await vm.start()
        await vm.set_link(0, up=False)
        ...
        await vm.kill()
    """

    #: Default bound on one QMP command.
    qmp_timeout_s: float = 30.0

    def __init__(self, cfg: VmConfig, *, qemu: str | None = None):
        self.cfg = cfg
        self._qemu = qemu
        self._state = VmState.NEW
        self._proc = None
        self._qmp: QMPClient | None = None
        self._exited: asyncio.Event | None = None  # created in start(): needs the running loop
        self._watcher: asyncio.Task | None = None
        self._returncode: int | None = None
        self._killing = False
        self.log = logging.getLogger(__name__).getChild(cfg.name)

    def __repr__(self) -> str:
        return f"<QemuVm {self.cfg.name!r} {self._state.value} pid={self.pid}>"

    # ------------------------------------------------------------ properties

    @property
    def state(self) -> VmState:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """QEMU's exit code once it has exited (negative: killed by that signal), else None."""
        return self._returncode

    @property
    def console_path(self) -> Path:
        return self.cfg.console_path

    @property
    def exited(self) -> asyncio.Event:
        """Set when the QEMU process has exited and been reaped. Await `exited.wait()` next to
        another wait to fail fast when the node dies. Exists from `start()` on."""
        if self._exited is None:
            raise StateError(f"node {self.cfg.name!r} is {self._state.value}: "
                             f"call start() before using exited")
        return self._exited

    def console_tail(self, n_lines: int = 30) -> str:
        """The last `n_lines` of the serial console (for error messages and artifacts)."""
        return _tail(self.cfg.console_path, n_lines)

    def qemu_log_tail(self, n_lines: int = 30) -> str:
        """The last `n_lines` of QEMU's own stdout/stderr."""
        return _tail(self.cfg.log_path, n_lines)

    # ------------------------------------------------------------ lifecycle

    async def start(self, *, timeout_s: float = 10.0) -> None:
        """Spawn QEMU and connect QMP, within `timeout_s`.

        Must run on a loop whose thread outlives the VM (see module docstring). On failure the
        process is killed and reaped before the error propagates.

        :raise ConfigError: invalid config (see build_argv).
        :raise EnvironmentProblem: QEMU is missing.
        :raise NodeCrashed: QEMU exited during start-up; the message has the tail of qemu.log.
        :raise VmlabTimeout: QMP did not answer within `timeout_s`.
        """
        if self._state is not VmState.NEW:
            raise StateError(f"node {self.cfg.name!r} is {self._state.value}; a QemuVm starts "
                             f"once: create a new QemuVm to start again")
        qemu = self._qemu or qemu_binary()
        argv = build_argv(self.cfg, qemu)
        self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
        # A stale socket could belong to a QEMU still running from an earlier run: never
        # connect to it by mistake.
        self.cfg.qmp_path.unlink(missing_ok=True)
        self._state = VmState.STARTING
        self._exited = asyncio.Event()
        t0 = time.monotonic()
        with open(self.cfg.log_path, "wb") as qlog:
            self._proc = process.spawn(argv, stdout=qlog, stderr=qlog)
        self.log.info("started QEMU pid %d (%s)", self._proc.pid, self.cfg.accel)
        self.log.debug("argv: %s", " ".join(argv))
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch_exit(), name=f"vmlab-qemu-exit-{self.cfg.name}")
        try:
            await self._connect_qmp(t0 + timeout_s, timeout_s)
        except BaseException:
            try:
                await self.kill()
            except Exception as err:  # cleanup must not hide the start error
                self.log.error("cleanup after failed start: %s", err)
            raise
        self._state = VmState.RUNNING
        self.log.info("QMP connected after %.3f s", time.monotonic() - t0)

    async def _watch_exit(self) -> None:
        assert self._proc is not None and self._exited is not None
        rc = await process.wait_exit_async(self._proc)
        self._returncode = rc
        if self._killing:
            self._state = VmState.KILLED
            self.log.info("QEMU pid %d killed (rc %d)", self._proc.pid, rc)
        else:
            self._state = VmState.EXITED
            self.log.warning("QEMU pid %d exited by itself with rc %d; qemu.log tail:\n%s",
                             self._proc.pid, rc, self.qemu_log_tail(10))
        self._exited.set()

    def _crashed(self, doing: str) -> NodeCrashed:
        return NodeCrashed(
            f"node {self.cfg.name!r}: QEMU (pid {self.pid}) exited with code {self._returncode} "
            f"while {doing}; see {self.cfg.log_path} and {self.cfg.console_path}\n"
            f"--- qemu.log (tail) ---\n{self.qemu_log_tail(15)}\n"
            f"--- console (tail) ---\n{self.console_tail(15)}")

    async def _connect_qmp(self, deadline: float, timeout_s: float) -> None:
        assert self._exited is not None
        last: object = "socket not created yet"
        while True:
            if self._exited.is_set():
                raise self._crashed("starting (before QMP answered)")
            if self.cfg.qmp_path.exists():
                client = QMPClient(self.cfg.name)
                # QEMU creates the socket file a moment before it listens, so an early attempt
                # is refused; qemu.qmp logs that as an ERROR. It is expected here and retried,
                # so this VM's qemu.qmp loggers are quiet until the connection is up.
                quiet = [logging.getLogger(f"qemu.qmp.{part}.{self.cfg.name}")
                         for part in ("protocol", "qmp_client")]
                levels = [q.level for q in quiet]
                for q in quiet:
                    q.setLevel(logging.CRITICAL)
                try:
                    remaining = max(0.1, deadline - time.monotonic())
                    await asyncio.wait_for(client.connect(str(self.cfg.qmp_path)), remaining)
                    self._qmp = client
                    return
                except (QMPError, OSError, asyncio.TimeoutError) as err:
                    last = err
                    await self._disconnect_quietly(client)
                finally:
                    for q, level in zip(quiet, levels):
                        q.setLevel(level)
            if time.monotonic() >= deadline:
                if self._exited.is_set():
                    raise self._crashed("starting (before QMP answered)")
                raise VmlabTimeout(
                    f"node {self.cfg.name!r}: QMP at {self.cfg.qmp_path} did not answer within "
                    f"{timeout_s:g} s (last: {last}); the host may be overloaded: see "
                    f"{self.cfg.log_path}", last=last)
            # Wake up early if QEMU exits; otherwise retry soon (the socket appears ~0.1 s
            # after spawn here).
            try:
                await asyncio.wait_for(self._exited.wait(), 0.02)
            except asyncio.TimeoutError:
                pass

    async def _disconnect_quietly(self, client: QMPClient) -> None:
        try:
            await asyncio.wait_for(client.disconnect(), 2.0)
        except Exception as err:  # the peer is usually dead already; nothing to do about it
            self.log.debug("QMP disconnect: %r", err)

    async def kill(self, *, timeout_s: float = 5.0) -> None:
        """SIGKILL QEMU's whole process group and reap it. Idempotent; safe in any state.

        A killed node's state is never saved: this is teardown, not shutdown.

        :raise VmlabTimeout: QEMU was not reaped within `timeout_s` after SIGKILL.
        """
        if self._proc is None:
            self._state = VmState.KILLED
            return
        self._killing = self._killing or not (self._exited and self._exited.is_set())
        client, self._qmp = self._qmp, None
        if client is not None:
            await self._disconnect_quietly(client)  # first, so it does not log a lost peer
        if self._returncode is None and self._proc.returncode is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)  # unreaped leader: the pgid is still ours
            except ProcessLookupError:
                pass
        assert self._watcher is not None and self._exited is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._exited.wait()), timeout_s)
        except asyncio.TimeoutError:
            raise VmlabTimeout(
                f"node {self.cfg.name!r}: QEMU pid {self.pid} survived SIGKILL for {timeout_s:g} s "
                f"(uninterruptible sleep?); check /proc/{self.pid}/stack and dmesg",
                last=self._proc.pid) from None

    async def until(self, awaitable, timeout_s: float | None) -> tuple[bool, Any]:
        """Await `awaitable` unless QEMU exits first: (True, its result) when it finished,
        (False, None) when QEMU exited. Raises asyncio.TimeoutError when `timeout_s` ran out
        first. Callers turn the last two into errors that say what they were waiting for."""
        assert self._exited is not None, "start() first"
        task = asyncio.ensure_future(awaitable)
        exited = asyncio.ensure_future(self._exited.wait())
        try:
            done, _ = await asyncio.wait({task, exited}, timeout=timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (task, exited):
                if not f.done():
                    f.cancel()
        if task in done:
            return True, task.result()
        if exited in done:
            return False, None
        raise asyncio.TimeoutError

    async def wait_exit(self, timeout_s: float) -> int:
        """Wait until QEMU exits (e.g. the guest powered off) and return its exit code.

        :raise VmlabTimeout: still running after `timeout_s`; `last` is the console tail.
        """
        ev = self.exited
        try:
            await asyncio.wait_for(ev.wait(), timeout_s)
        except asyncio.TimeoutError:
            tail = self.console_tail(15)
            raise VmlabTimeout(f"node {self.cfg.name!r}: QEMU still running after {timeout_s:g} s"
                               f"; console tail:\n{tail}", last=tail) from None
        assert self._returncode is not None
        return self._returncode

    # ------------------------------------------------------------ QMP

    async def qmp(self, cmd: str, args: Mapping[str, Any] | None = None, /, **kwargs: Any) -> Any:
        """Run one QMP command and return its `return` value.

        Arguments come from `args` and/or keywords; use `args` for names with dashes::

            await vm.qmp("query-status")                          # {'status': 'running', ...}
            await vm.qmp("set_link", name="nic0", up=False)
            await vm.qmp("human-monitor-command", {"command-line": "info network"})

        :raise NodeCrashed: QEMU has exited, or exits during the command.
        :raise StateError: the node was never started or has been killed.
        :raise VmlabTimeout: no answer within `qmp_timeout_s`.
        :raise VmlabError: QEMU rejected the command (message has QEMU's error class and text).
        """
        arguments = {**(args or {}), **kwargs}
        if self._exited is not None and self._exited.is_set() and not self._killing:
            raise self._crashed(f"running QMP {cmd}")
        if self._qmp is None or self._state is not VmState.RUNNING:
            raise StateError(f"node {self.cfg.name!r} is {self._state.value}; QMP needs a started, "
                             f"running node: call start() first")
        assert self._exited is not None
        run = asyncio.ensure_future(self._qmp.execute(cmd, arguments or None))
        died = asyncio.ensure_future(self._exited.wait())
        try:
            done, _ = await asyncio.wait({run, died}, timeout=self.qmp_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
            if not run.done():
                run.cancel()
        if run in done:
            try:
                return run.result()
            except ExecuteError as err:
                raise VmlabError(f"node {self.cfg.name!r}: QMP {cmd} {arguments or ''} failed: "
                                 f"{err.error_class}: {err}") from err
            except QMPError as err:
                # A dying QEMU closes its QMP socket while the kernel is still tearing it
                # down, before it can be reaped: give the exit a moment to land before
                # calling this anything but a crash.
                try:
                    await asyncio.wait_for(self._exited.wait(), 2.0)
                except asyncio.TimeoutError:
                    pass
                if self._exited.is_set():
                    raise self._crashed(f"running QMP {cmd}") from err
                raise VmlabError(f"node {self.cfg.name!r}: QMP {cmd} failed: {err!r}; "
                                 f"see {self.cfg.log_path}") from err
        if self._exited.is_set():
            raise self._crashed(f"running QMP {cmd}")
        raise VmlabTimeout(f"node {self.cfg.name!r}: QMP {cmd} got no answer within "
                           f"{self.qmp_timeout_s:g} s; QEMU may be hung: see {self.cfg.log_path}",
                           last=cmd)

    async def set_link(self, nic_index: int, up: bool) -> None:
        """Plug (`up=True`) or pull the cable of NIC `nic_index`; the guest sees carrier change.

        :raise ConfigError: no such NIC.
        """
        if not 0 <= nic_index < len(self.cfg.nics):
            raise ConfigError(f"node {self.cfg.name!r} has {len(self.cfg.nics)} NIC(s); "
                              f"nic_index {nic_index} is out of range")
        # Name the netdev, not the NIC: QEMU then flips both ends (qmp_set_link changes a NIC
        # peer too, but not a netdev peer), so frames from vnet are dropped at the netdev and
        # guest frames at the NIC, and the guest still sees carrier change on the NIC.
        await self.qmp("set_link", name=f"net{nic_index}", up=up)
        self.log.info("nic%d link %s", nic_index, "up" if up else "down")
