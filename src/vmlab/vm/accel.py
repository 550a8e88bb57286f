"""Which accelerator QEMU should use: KVM if it really runs guest code fast, else TCG.

A `/dev/kvm` that opens is not proof: on a nested PVM host (`kvm_pvm`) KVM emulates ordinary
guest code about 300x slower than TCG (reference/measurements-boot-snapshot.md §1). So we run
code: a 64 KiB firmware, generated here, loops `PROBE_ITERATIONS` times and then writes to
QEMU's `isa-debug-exit` port. Real KVM finishes in milliseconds, TCG in ~0.2 s, PVM emulation
would need tens of seconds, so a `KVM_PROBE_TIMEOUT_S` bound separates them.

The verdict is cached per host boot and QEMU binary in `<cache_root>/accel.json` and memoized in
this process, so only the first process after a boot pays for the probe. `VMLAB_ACCEL=kvm|tcg`
overrides everything. This module also owns finding the QEMU binary (`qemu_binary()`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..errors import ConfigError, EnvironmentProblem
from . import process

__all__ = ["AccelChoice", "choose_accel", "qemu_binary", "probe_firmware", "run_probe",
           "ProbeResult", "ACCEL_ENV", "PROBE_ITERATIONS", "KVM_PROBE_TIMEOUT_S"]

log = logging.getLogger("vmlab.accel")

ACCEL_ENV = "VMLAB_ACCEL"
QEMU_BINARY = "qemu-system-x86_64"
#: Loop count of the probe: ~0.15 s under TCG here, ~10 ms under real KVM, ~30 s under PVM.
PROBE_ITERATIONS = 20_000_000
#: Bound on the KVM probe run, QEMU start-up (~0.1 s) included.
KVM_PROBE_TIMEOUT_S = 1.5
#: Bound on the TCG sanity run; generous, it checks correctness, not speed (the host may be busy).
TCG_PROBE_TIMEOUT_S = 20.0
#: Bump when the probe changes, to invalidate cached verdicts.
PROBE_VERSION = 1
#: Value the firmware writes to isa-debug-exit; QEMU then exits with (value << 1) | 1.
PROBE_EXIT_VALUE = 0x31
PROBE_EXIT_CODE = (PROBE_EXIT_VALUE << 1) | 1
_DEBUG_EXIT_PORT = 0xF4
_COM1 = 0x3F8
_CACHE_FILE = "accel.json"
_KVM_DEVICE = "/dev/kvm"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator to pass to `-accel`, and why it was chosen.

    name: "kvm" or "tcg".
    reason: one human sentence, suitable for logs and `vmlab doctor`.
    probe_s: wall time of the KVM probe the verdict rests on (QEMU start included), or None if
        no KVM probe was run (forced, or no usable /dev/kvm).
    cached: True if the verdict came from this process's memo or the per-boot cache file.
    """
    name: str
    reason: str
    probe_s: float | None = None
    cached: bool = False


@dataclass(frozen=True)
class ProbeResult:
    """One run of the probe firmware. `finished` means QEMU exited via isa-debug-exit in time."""
    accel: str
    finished: bool
    timed_out: bool
    elapsed_s: float
    returncode: int | None
    serial: str  # "SE" when the loop ran to the end, "S" when it started but did not finish
    stderr: str


def qemu_binary() -> str:
    """Absolute path of qemu-system-x86_64, or raise EnvironmentProblem with the install command."""
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise EnvironmentProblem(f"{QEMU_BINARY} not found; install it with: "
                                 f"sudo apt-get install qemu-system-x86 qemu-utils")
    return path


def probe_firmware(iterations: int = PROBE_ITERATIONS) -> bytes:
    """A 64 KiB BIOS image for `-machine pc -bios`: print 'S', loop, print 'E', exit QEMU.

    The CPU starts in real mode at F000:FFF0 (the last 16 bytes of the image); a far jump there
    goes to F000:0000, the start of the image, where the code is.
    """
    if not 0 < iterations < 2**32:
        raise ValueError(f"iterations must be in 1..2**32-1, got {iterations}")
    code = b"".join([
        b"\xfa",                                    # cli
        b"\xba" + struct.pack("<H", _COM1),         # mov dx, COM1
        b"\xb0" + b"S", b"\xee",                    # mov al, 'S' ; out dx, al
        b"\x66\xb9" + struct.pack("<I", iterations),  # mov ecx, iterations
        b"\x66\x49",                                # loop: dec ecx
        b"\x75\xfc",                                #       jnz loop (-4)
        b"\xb0" + b"E", b"\xee",                    # mov al, 'E' ; out dx, al
        b"\xba" + struct.pack("<H", _DEBUG_EXIT_PORT),  # mov dx, isa-debug-exit
        b"\xb0" + bytes([PROBE_EXIT_VALUE]), b"\xee",   # mov al, value ; out dx, al -> QEMU exits
        b"\xf4",                                    # halt: hlt
        b"\xeb\xfd",                                #       jmp halt (-3)
    ])
    image = bytearray(b"\xf4" * 0x10000)            # hlt everywhere else
    image[:len(code)] = code
    image[0xFFF0:0xFFF5] = b"\xea\x00\x00\x00\xf0"  # reset vector: jmp far F000:0000
    return bytes(image)


def probe_argv(qemu: str, accel: str, firmware: Path) -> list[str]:
    """The command line of one probe run. Uses the same -cpu as real nodes under that accel."""
    cpu = ["-cpu", "host"] if accel == "kvm" else []
    return [qemu, "-accel", accel, *cpu, "-machine", "pc", "-m", "16",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", "stdio", "-bios", str(firmware),
            "-device", f"isa-debug-exit,iobase={_DEBUG_EXIT_PORT:#x},iosize=1"]


def run_probe(accel: str, *, timeout_s: float, iterations: int = PROBE_ITERATIONS,
              qemu: str | None = None) -> ProbeResult:
    """Run the probe firmware once under `accel`; blocking, bounded by `timeout_s`.

    Runs in the calling thread, which lives for the whole run, so process.spawn's
    parent-death signal is safe here.
    """
    qemu = qemu or qemu_binary()
    with tempfile.TemporaryDirectory(prefix="vmlab-probe-") as tmp:
        fw = Path(tmp) / "probe.bin"
        fw.write_bytes(probe_firmware(iterations))
        t0 = time.monotonic()
        proc = process.spawn(probe_argv(qemu, accel, fw),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            process.kill_group(proc)
            out, err = proc.communicate()
        finally:
            if proc.returncode is None:  # e.g. KeyboardInterrupt during communicate
                process.kill_group(proc)
        elapsed = time.monotonic() - t0
        process.kill_group(proc)  # reaped already; drops it from the owned set
    serial = out.decode(errors="replace")
    finished = (not timed_out and proc.returncode == PROBE_EXIT_CODE and serial.endswith("E"))
    return ProbeResult(accel=accel, finished=finished, timed_out=timed_out, elapsed_s=elapsed,
                       returncode=None if timed_out else proc.returncode, serial=serial,
                       stderr=err.decode(errors="replace").strip())


def _describe_failure(r: ProbeResult, iterations: int, timeout_s: float) -> str:
    if r.timed_out:
        started = "started but " if r.serial.startswith("S") else ""
        return (f"guest code {started}did not finish {iterations / 1e6:g}M iterations within "
                f"{timeout_s:g} s")
    lines = [ln.removeprefix("qemu-system-x86_64: ") for ln in r.stderr.splitlines() if ln.strip()]
    detail = "; ".join(lines)[:300] if lines else f"serial output {r.serial!r}"
    return (f"QEMU -accel {r.accel} exited with code {r.returncode} after {r.elapsed_s:.2f} s "
            f"instead of finishing the loop ({detail})")


# ---------------------------------------------------------------- the verdict and its cache

_memo: dict[str, AccelChoice] = {}
_memo_lock = threading.Lock()


def _kvm_device_problem() -> str | None:
    """None if /dev/kvm opens read-write, else why not."""
    if not os.path.exists(_KVM_DEVICE):
        return f"{_KVM_DEVICE} does not exist (no KVM on this host, or not passed through)"
    try:
        fd = os.open(_KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return (f"{_KVM_DEVICE} cannot be opened read-write ({err.strerror}); "
                f"add your user to the 'kvm' group")
    os.close(fd)
    return None


def _cache_key(qemu: str, kvm_problem: str | None) -> str:
    try:
        boot_id = Path(_BOOT_ID).read_text().strip()
    except OSError:
        boot_id = "unknown-boot"
    st = os.stat(qemu)
    # The binary's identity (path, size, mtime) changes whenever QEMU is upgraded, without
    # spawning `qemu --version` (which would cost as much as a cache miss saves).
    kvm = "kvm-ok" if kvm_problem is None else "kvm-unusable"
    return f"v{PROBE_VERSION}|{boot_id}|{os.path.realpath(qemu)}|{st.st_size}|{st.st_mtime_ns}|{kvm}"


def _cache_path() -> Path:
    return paths.cache_root() / _CACHE_FILE


def _load_cached(key: str) -> AccelChoice | None:
    try:
        data = json.loads(_cache_path().read_text())
        if data.get("key") != key or data.get("name") not in ("kvm", "tcg"):
            return None
        return AccelChoice(name=data["name"], reason=str(data["reason"]),
                           probe_s=data.get("probe_s"), cached=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _store(key: str, choice: AccelChoice) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "name": choice.name, "reason": choice.reason,
                                   "probe_s": choice.probe_s}))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
    except OSError as err:
        # The verdict is still right; only later processes will have to probe again.
        log.warning("could not cache the accelerator verdict in %s (%s); set VMLAB_CACHE to a "
                    "writable directory to skip the probe next time", path, err.strerror)


def _forced(value: str) -> AccelChoice:
    if value == "tcg":
        return AccelChoice("tcg", f"{ACCEL_ENV}=tcg")
    problem = _kvm_device_problem()
    if problem is not None:
        raise EnvironmentProblem(f"{ACCEL_ENV}=kvm but KVM is unusable: {problem}; "
                                 f"fix that or unset {ACCEL_ENV} to fall back to TCG")
    return AccelChoice("kvm", f"{ACCEL_ENV}=kvm (probe skipped)")


def _probe_and_decide(qemu: str, kvm_problem: str | None) -> AccelChoice:
    probe_s = None
    if kvm_problem is None:
        r = run_probe("kvm", timeout_s=KVM_PROBE_TIMEOUT_S, qemu=qemu)
        probe_s = r.elapsed_s
        log.debug("KVM probe: %s", r)
        if r.finished:
            return AccelChoice("kvm", f"KVM probe: {PROBE_ITERATIONS / 1e6:g}M iterations of "
                                      f"guest code ran in {r.elapsed_s:.2f} s", probe_s)
        why = _describe_failure(r, PROBE_ITERATIONS, KVM_PROBE_TIMEOUT_S)
        if r.timed_out:
            why += (" (this KVM emulates instead of running guest code natively, "
                    "e.g. a nested PVM host)")
        else:
            why += " (KVM is present but cannot run an ordinary `-cpu host` guest)"
        reason = f"KVM probe: {why}; using TCG (set {ACCEL_ENV}=kvm to insist)"
    else:
        reason = f"KVM unusable: {kvm_problem}; using TCG"
    # Cheap (~0.2 s, once per boot) and it proves the probe firmware itself is right: a broken
    # firmware would otherwise make every host look like "KVM too slow".
    t = run_probe("tcg", timeout_s=TCG_PROBE_TIMEOUT_S, qemu=qemu)
    log.debug("TCG probe: %s", t)
    if not t.finished:
        raise EnvironmentProblem(
            f"QEMU could not run vmlab's probe firmware under TCG either: "
            f"{_describe_failure(t, PROBE_ITERATIONS, TCG_PROBE_TIMEOUT_S)}; "
            f"check the QEMU install ({qemu} -accel tcg -machine pc) and the host's load")
    return AccelChoice("tcg", reason, probe_s)


def choose_accel() -> AccelChoice:
    """Pick the accelerator for this host: "kvm" only if KVM runs guest code fast, else "tcg".

    Blocking; at most ~2 s on the first call after a boot, instant afterwards (cached).
    Thread-safe. Example::

        choice = choose_accel()
        # AccelChoice(name='tcg', reason='KVM probe: guest code started but did not finish
        #             20M iterations within 1.5 s (...); using TCG (set VMLAB_ACCEL=kvm ...)', ...)

    :raise EnvironmentProblem: QEMU is missing, `VMLAB_ACCEL=kvm` but /dev/kvm is unusable, or
        QEMU cannot run guest code at all.
    :raise ConfigError: `VMLAB_ACCEL` has an unknown value.
    """
    qemu = qemu_binary()
    forced = os.environ.get(ACCEL_ENV, "").strip().lower()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise ConfigError(f"{ACCEL_ENV}={forced!r} is not known; use 'kvm', 'tcg', "
                              f"or unset it to probe")
        choice = _forced(forced)
        log.info("accelerator %s: %s", choice.name, choice.reason)
        return choice
    kvm_problem = _kvm_device_problem()
    key = _cache_key(qemu, kvm_problem)
    with _memo_lock:  # one probe per process even when nodes start in parallel
        choice = _memo.get(key)
        if choice is not None:
            return choice
        choice = _load_cached(key)
        if choice is None:
            choice = _probe_and_decide(qemu, kvm_problem)
            _store(key, choice)
            log.info("accelerator %s: %s", choice.name, choice.reason)
        else:
            log.info("accelerator %s (cached for this boot): %s", choice.name, choice.reason)
        _memo[key] = AccelChoice(choice.name, choice.reason, choice.probe_s, cached=True)
        return choice
