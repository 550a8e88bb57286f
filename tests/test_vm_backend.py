"""The QEMU backend: argv, start/QMP/kill, exit detection, set_link, and no orphans.

These run real QEMU processes but boot nothing: VMs are started paused (`-S`) or run vmlab's
tiny probe firmware, so no kernel image is needed.
"""
from __future__ import annotations

import asyncio
import errno
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vmlab.errors import ConfigError, NodeCrashed, StateError, VmlabError, VmlabTimeout
from vmlab.vm import accel, process
from vmlab.vm.qemu import NicConfig, QemuVm, VmConfig, VmState, build_argv

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 not installed")


@pytest.fixture
def run_dir():
    # Short on purpose: unix socket paths must stay under 108 bytes, and pytest's tmp_path
    # can be long.
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="vmlab-t-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _wait_gone(pid: int, bound_s: float) -> bool:
    """Poll /proc until `pid` is gone (or a zombie). A correctness bound, not a timing check."""
    deadline = time.monotonic() + bound_s
    while process.is_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


# ---------------------------------------------------------------- build_argv (no QEMU)

def _two_nic_cfg(**kw) -> VmConfig:
    rd = Path("/tmp/vmlab/run/alice")
    base = dict(name="alice", run_dir=rd, kernel=Path("/c/vmlinux"), initrd=Path("/c/a.cpio"),
                kernel_args="console=ttyS0 quiet", extra_kernel_args="vmlab.node=alice",
                nics=(NicConfig("52:cc:cc:cc:cc:01", rd / "nic0.sock"),
                      NicConfig("52:cc:cc:cc:cc:11", rd / "nic1.sock")))
    base.update(kw)
    return VmConfig(**base)


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_argv_two_nics():
    argv = build_argv(_two_nic_cfg(), "/usr/bin/qemu-system-x86_64")
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert _opt(argv, "-machine") == ["pc"]
    assert _opt(argv, "-accel") == ["tcg"] and "-cpu" not in argv
    assert _opt(argv, "-m") == ["256"] and _opt(argv, "-smp") == ["1"]
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert _opt(argv, "-display") == ["none"]
    assert _opt(argv, "-kernel") == ["/c/vmlinux"] and _opt(argv, "-initrd") == ["/c/a.cpio"]
    # tty0 for the dashboard's screen, ttyS0 last so /dev/console stays the serial port
    assert _opt(argv, "-append") == ["console=tty0 console=ttyS0 quiet vmlab.node=alice"]
    assert _opt(argv, "-vga") == ["std"]
    assert _opt(argv, "-chardev") == ["file,id=console,path=/tmp/vmlab/run/alice/console.log"]
    assert _opt(argv, "-serial") == ["chardev:console"]
    assert _opt(argv, "-qmp") == ["unix:/tmp/vmlab/run/alice/qmp.sock,server=on,wait=off"]
    assert _opt(argv, "-netdev") == [
        "stream,id=net0,server=on,addr.type=unix,addr.path=/tmp/vmlab/run/alice/nic0.sock",
        "stream,id=net1,server=on,addr.type=unix,addr.path=/tmp/vmlab/run/alice/nic1.sock",
    ]
    assert _opt(argv, "-device") == [
        "virtio-net-pci,netdev=net0,id=nic0,mac=52:cc:cc:cc:cc:01,romfile=",
        "virtio-net-pci,netdev=net1,id=nic1,mac=52:cc:cc:cc:cc:11,romfile=",
    ]
    assert "-S" not in argv


def test_argv_kvm_uses_host_cpu_and_options():
    argv = build_argv(_two_nic_cfg(accel="kvm", memory_mb=512, cpus=2, start_paused=True,
                                   extra_args=("-incoming", "defer")))
    assert _opt(argv, "-accel") == ["kvm"] and _opt(argv, "-cpu") == ["host"]
    assert _opt(argv, "-m") == ["512"] and _opt(argv, "-smp") == ["2"]
    assert "-S" in argv and argv[-2:] == ["-incoming", "defer"]


def test_argv_without_display():
    argv = build_argv(_two_nic_cfg(vga=False))
    assert "-vga" not in argv
    assert _opt(argv, "-append") == ["console=ttyS0 quiet vmlab.node=alice"]


def test_argv_display_leaves_a_command_line_without_serial_console_alone():
    # console=tty0 alone would make the screen /dev/console and empty console.log
    argv = build_argv(_two_nic_cfg(kernel_args="quiet"))
    assert _opt(argv, "-append") == ["quiet vmlab.node=alice"] and _opt(argv, "-vga") == ["std"]


def test_argv_without_kernel():
    argv = build_argv(VmConfig(name="bare", run_dir=Path("/tmp/x")))
    assert "-kernel" not in argv and "-append" not in argv and "-netdev" not in argv


@pytest.mark.parametrize("kw, match", [
    (dict(accel="hvf"), "accel 'hvf'"),
    (dict(name="a b"), "name"),
    (dict(memory_mb=1), "memory_mb"),
    (dict(nics=(NicConfig("52:cc:cc:cc:cc", Path("/tmp/n.sock")),)), "nics\\[0\\].mac"),
    (dict(nics=(NicConfig("53:cc:cc:cc:cc:01", Path("/tmp/n.sock")),)), "multicast"),
    (dict(kernel=None), "without a kernel"),
    (dict(run_dir=Path("/tmp/" + "d" * 100)), "QMP socket path .* is 114 bytes; unix sockets allow at most 107"),
    (dict(nics=(NicConfig("52:cc:cc:cc:cc:01", Path("/tmp/" + "n" * 110)),)), "nics\\[0\\] socket"),
], ids=["accel", "name", "memory", "mac-short", "mac-multicast", "initrd-no-kernel",
        "long-qmp-path", "long-nic-path"])
def test_argv_rejects_bad_config(kw, match):
    with pytest.raises(ConfigError, match=match):
        build_argv(_two_nic_cfg(**kw))


# ---------------------------------------------------------------- real QEMU


@needs_qemu
def test_start_qmp_kill(run_dir):
    async def main():
        vm = QemuVm(VmConfig(name="t1", run_dir=run_dir, start_paused=True))
        with pytest.raises(StateError, match="call start"):
            vm.exited
        await vm.start()
        assert vm.state is VmState.RUNNING
        pid = vm.pid
        assert process.is_alive(pid) and os.getpgid(pid) == pid  # its own group
        assert pid in process.owned_pids()
        status = await vm.qmp("query-status")
        assert status["status"] == "prelaunch" and status["running"] is False
        with pytest.raises(VmlabError, match="CommandNotFound"):
            await vm.qmp("no-such-command")
        with pytest.raises(StateError, match="starts once"):
            await vm.start()
        await vm.kill()
        assert vm.state is VmState.KILLED and vm.returncode == -signal.SIGKILL
        assert vm.exited.is_set()
        await vm.kill()  # idempotent
        with pytest.raises(StateError):
            await vm.qmp("query-status")
        return pid

    pid = asyncio.run(main())
    assert not os.path.exists(f"/proc/{pid}"), "QEMU not reaped after kill()"
    assert _group_gone(pid), "QEMU's process group still has members after kill()"
    assert pid not in process.owned_pids()


def _probe_vm(run_dir: Path, name: str, iterations: int) -> QemuVm:
    fw = run_dir / "probe.bin"
    fw.write_bytes(accel.probe_firmware(iterations))
    return QemuVm(VmConfig(name=name, run_dir=run_dir, memory_mb=16, bios=fw,
                           extra_args=("-device", "isa-debug-exit,iobase=0xf4,iosize=1")))


@needs_qemu
def test_guest_exit_is_noticed_and_console_captured(run_dir):
    async def main():
        vm = _probe_vm(run_dir, "t2", 20_000_000)
        try:
            await vm.start()
        except NodeCrashed:
            pass  # the firmware may finish before QMP connects; exit is what we test
        rc = await vm.wait_exit(60.0)
        assert rc == accel.PROBE_EXIT_CODE == vm.returncode
        assert vm.exited.is_set()
        assert vm.console_tail(5) == "SE"
        if vm.state is not VmState.KILLED:  # start() kills on NodeCrashed; otherwise it exited
            assert vm.state is VmState.EXITED
            with pytest.raises(NodeCrashed, match="exited with code 99"):
                await vm.qmp("query-status")
        await vm.kill()  # no-op on an exited VM

    asyncio.run(main())


@needs_qemu
def test_qmp_fails_fast_when_qemu_dies(run_dir):
    async def main():
        vm = _probe_vm(run_dir, "t3", 0xFFFFFFFF)  # runs ~30 s under TCG
        await vm.start()
        with pytest.raises(VmlabTimeout, match="still running"):
            await vm.wait_exit(0.2)
        os.kill(vm.pid, signal.SIGKILL)  # not via vm.kill(): an unexpected death
        with pytest.raises(NodeCrashed, match="exited with code -9"):
            for _ in range(1000):  # each call either succeeds or raises once QEMU is gone
                await vm.qmp("query-status")
        assert vm.state is VmState.EXITED
        await vm.kill()

    asyncio.run(main())


@needs_qemu
def test_start_fails_fast_with_qemu_log_tail(run_dir):
    async def main():
        vm = QemuVm(VmConfig(name="t4", run_dir=run_dir, start_paused=True,
                             extra_args=("-device", "no-such-device-model")))
        with pytest.raises(NodeCrashed, match="no-such-device-model") as ei:
            await vm.start(timeout_s=60.0)
        assert "qemu.log (tail)" in str(ei.value)
        assert vm.returncode == 1
        return vm.pid

    pid = asyncio.run(main())
    assert not os.path.exists(f"/proc/{pid}")


@needs_qemu
def test_set_link(run_dir):
    """set_link reaches the right QEMU object for each NIC.

    QEMU 7.2 shows link state neither in `info network` nor in `query-rx-filter`, and with no
    guest driver the stream netdev stops reading after one frame whether the link is up or down,
    so the carrier effect itself is checked by guest tests (measurements-net-channels.md §5).
    What this test can prove: QEMU resolves the names we send (it rejects unknown ones), for
    every NIC, in both directions.
    """
    async def main():
        nics = (NicConfig("52:cc:cc:cc:cc:01", run_dir / "n0.sock"),
                NicConfig("52:cc:cc:cc:cc:11", run_dir / "n1.sock"))
        vm = QemuVm(VmConfig(name="t5", run_dir=run_dir, start_paused=True, nics=nics))
        await vm.start()
        try:
            with pytest.raises(VmlabError, match="not found"):  # QEMU checks the name
                await vm.qmp("set_link", name="net9", up=False)
            for i in range(len(nics)):
                await vm.set_link(i, False)
                await vm.set_link(i, True)
            with pytest.raises(ConfigError, match="out of range"):
                await vm.set_link(2, False)
            info = await vm.qmp("human-monitor-command", {"command-line": "info network"})
            assert "nic1: index=0,type=nic,model=virtio-net-pci,macaddr=52:cc:cc:cc:cc:11" in info
            assert "net1: index=0,type=stream" in info
        finally:
            await vm.kill()

    asyncio.run(main())


_ORPHAN_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from vmlab.vm.qemu import QemuVm, VmConfig

    async def main():
        vm = QemuVm(VmConfig(name="orphan", run_dir=Path(sys.argv[1]), start_paused=True))
        await vm.start()
        print(vm.pid, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


@needs_qemu
def test_no_orphan_when_owner_is_sigkilled(run_dir):
    owner = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT, str(run_dir)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    qemu_pid = None
    try:
        ready, _, _ = select.select([owner.stdout], [], [], 60.0)
        assert ready, "the owner process did not start QEMU within 60 s"
        line = owner.stdout.readline().strip()
        assert line, f"owner printed nothing; stderr: {owner.stderr.read().decode()[-2000:]}"
        qemu_pid = int(line)
        assert process.is_alive(qemu_pid)
        with open(f"/proc/{qemu_pid}/stat") as f:
            assert f.read().split(") ")[1].split()[1] == str(owner.pid)  # really its child
        owner.send_signal(signal.SIGKILL)  # no cleanup code can run in the owner
        owner.wait(timeout=30)
        assert _wait_gone(qemu_pid, 10.0), f"QEMU pid {qemu_pid} outlived its SIGKILLed owner"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if qemu_pid is not None and process.is_alive(qemu_pid):
            # Our own test child's child, identified by pid; only hit if the test failed.
            try:
                os.killpg(qemu_pid, signal.SIGKILL)
            except OSError as err:
                assert err.errno == errno.ESRCH
        owner.stdout.close()
        owner.stderr.close()
