"""Child processes that die with us: spawn, watch for exit, kill the whole group.

This module owns the lifetime of every hypervisor process vmlab starts. It knows nothing about
QEMU; `vm/qemu.py` builds the command line and talks QMP.

Guarantees, and how:

* **No orphans if we are killed.** Each child runs in its own session and process group
  (`start_new_session=True`), and sets `prctl(PR_SET_PDEATHSIG, SIGKILL)` in the forked child
  before `exec`, so the kernel SIGKILLs it when its parent dies, even by SIGKILL. The child then
  compares `os.getppid()` with the parent's pid recorded before the fork: if the parent died
  between `fork()` and `prctl()`, the signal would never come, so the child kills itself.
* **No orphans if we exit normally.** `kill_owned()` runs at interpreter exit and kills every
  group we still own.
* **We never kill what is not ours.** We track our own `Popen` objects and only signal their
  process groups, and only while the leader is not yet reaped (its pid, and so its process group
  id, cannot be reused before that). Nothing is ever killed by name.

Caveat (important for callers): PDEATHSIG fires when the *thread* that forked the child exits, not
when the process exits (see prctl(2): "the parent in this case is considered to be the thread that
created this process"). Spawn children from a thread that lives as long as their owner: vmlab
spawns from the Env's event-loop thread, which lives until the Env closes. Never spawn from
`asyncio.to_thread()` or another executor thread: when the pool retires that worker, the child
gets SIGKILL.
"""
from __future__ import annotations

import asyncio
import atexit
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import threading
from typing import IO, Sequence, Union

from ..errors import EnvironmentProblem, VmlabTimeout

__all__ = ["spawn", "kill_group", "wait_exit_async", "owned_pids", "kill_owned", "is_alive"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# Resolved in the parent so the forked child only makes a plain foreign call, no dlopen.
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

_owned: dict[int, subprocess.Popen] = {}
_owned_lock = threading.Lock()

_File = Union[int, IO, None]


def _child_setup(parent_pid: int) -> None:
    """Runs in the forked child before exec. Keep it tiny: no allocation-heavy work, no locks."""
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)
    # The parent may have died before prctl() took effect; then we were re-parented already and
    # PDEATHSIG will never fire.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def spawn(
    argv: Sequence[str],
    *,
    stdin: _File = subprocess.DEVNULL,
    stdout: _File = None,
    stderr: _File = None,
    cwd: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start `argv` in its own process group, to be SIGKILLed by the kernel when this thread dies.

    Call it from a thread that outlives the child (see the module docstring). The returned
    process is tracked until it is reaped by `kill_group`, `wait_exit_async` or `Popen.wait`.

    :raise EnvironmentProblem: the program does not exist or cannot be executed.
    """
    parent_pid = os.getpid()
    try:
        proc = subprocess.Popen(
            list(argv), stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=env,
            start_new_session=True,
            preexec_fn=lambda: _child_setup(parent_pid),
            close_fds=True,
        )
    except (FileNotFoundError, PermissionError) as err:
        raise EnvironmentProblem(f"cannot execute {argv[0]!r}: {err.strerror}; "
                                 f"check that it is installed and on PATH") from err
    with _owned_lock:
        _owned[proc.pid] = proc
    log.debug("spawned pid %d (thread %s): %s", proc.pid, threading.current_thread().name,
              " ".join(argv))
    return proc


def _forget(proc: subprocess.Popen) -> None:
    with _owned_lock:
        _owned.pop(proc.pid, None)


def _signal_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal proc's group, but only while the leader is unreaped (so the pgid is still ours)."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, sig)  # start_new_session: pgid == pid
    except ProcessLookupError:
        pass


def kill_group(proc: subprocess.Popen, *, timeout_s: float = 5.0) -> int:
    """SIGKILL `proc`'s whole process group and reap the leader. Idempotent; blocking.

    For code on an event loop, prefer `wait_exit_async` after `os.killpg` (QemuVm.kill does).

    :return: the leader's return code (negative signal number when killed).
    :raise VmlabTimeout: the leader was not reaped within `timeout_s` (stuck in the kernel).
    """
    _signal_group(proc)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise VmlabTimeout(
            f"pid {proc.pid} survived SIGKILL for {timeout_s} s (uninterruptible sleep?); "
            f"check `cat /proc/{proc.pid}/stack` and the host's dmesg", last=_proc_state(proc.pid)
        ) from err
    _forget(proc)
    return rc


async def wait_exit_async(proc: subprocess.Popen) -> int:
    """Wait on the running loop, without a thread, until `proc` exits; reap it and return its code.

    Uses a pidfd (Linux >= 5.3): it becomes readable when the process exits. Just before
    reaping, the rest of the process group is SIGKILLed, so helpers the leader spawned (e.g. a
    migration `exec:` command) do not outlive it. Cancel-safe.
    """
    if proc.returncode is not None:
        _forget(proc)
        return proc.returncode
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        pidfd = None  # already reaped by someone else via waitpid
    except OSError:
        pidfd = -1  # no pidfd support: fall back to a polling wait below
    if pidfd is not None and pidfd >= 0:
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_reader(pidfd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
    elif pidfd == -1:
        while proc.poll() is None:
            await asyncio.sleep(0.05)  # fallback only for kernels without pidfd_open
    # The leader is a zombie now (not reaped), so its pgid is still ours: sweep the group.
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    rc = proc.wait()  # non-blocking: the process has exited
    _forget(proc)
    return rc


def owned_pids() -> set[int]:
    """Pids of the children this process spawned and has not reaped yet."""
    with _owned_lock:
        return set(_owned)


def kill_owned() -> None:
    """SIGKILL every group we still own and reap them. Runs at interpreter exit."""
    with _owned_lock:
        procs = list(_owned.values())
    for proc in procs:
        try:
            kill_group(proc, timeout_s=2.0)
        except Exception as err:  # cleanup: one failure must not stop the rest
            log.error("could not kill pid %d at exit: %s", proc.pid, err)


atexit.register(kill_owned)


def _proc_state(pid: int) -> str | None:
    """The state letter from /proc/<pid>/stat ('R', 'S', 'Z', ...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may contain spaces and parentheses; the state follows the last ')'.
    return data[data.rindex(b")") + 2:][:1].decode()


def is_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (a zombie's code no longer runs)."""
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")

