"""The accelerator probe: firmware correctness, verdicts, forcing, the per-boot cache."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from vmlab.errors import ConfigError, EnvironmentProblem
from vmlab.vm import accel

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 not installed")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Fresh cache dir, no memo, no forcing, for every test."""
    monkeypatch.setenv("VMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(accel.ACCEL_ENV, raising=False)
    monkeypatch.setattr(accel, "_memo", {})


def _kvm_device_usable() -> bool:
    return accel._kvm_device_problem() is None


def _pvm_host() -> bool:
    return os.path.isdir("/sys/module/kvm_pvm")


def test_firmware_layout():
    fw = accel.probe_firmware(1234)
    assert len(fw) == 0x10000
    assert fw[0xFFF0:0xFFF5] == b"\xea\x00\x00\x00\xf0"  # reset vector: jmp far F000:0000
    assert (1234).to_bytes(4, "little") in fw[:64]
    with pytest.raises(ValueError):
        accel.probe_firmware(0)


@needs_qemu
def test_firmware_runs_to_the_end_under_tcg():
    """Proves the firmware is right: a broken one would make every host look like 'KVM slow'."""
    r = accel.run_probe("tcg", timeout_s=30.0)
    assert r.finished, r
    assert r.serial == "SE" and r.returncode == accel.PROBE_EXIT_CODE


@needs_qemu
def test_firmware_timeout_is_detected_under_tcg():
    """A loop that cannot finish in time is reported as timed out, and QEMU is reaped."""
    r = accel.run_probe("tcg", timeout_s=0.3, iterations=0xFFFFFFFF)  # ~30 s of guest code
    assert r.timed_out and not r.finished, r
    assert r.returncode is None
    from vmlab.vm import process
    assert process.owned_pids() == set()


@needs_qemu
@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")
@pytest.mark.skipif(not _pvm_host(), reason="KVM here is not the slow nested PVM of the dev box")
def test_picks_tcg_on_this_host_and_says_why():
    choice = accel.choose_accel()
    assert choice.name == "tcg"
    assert "KVM" in choice.reason
    assert "TCG" in choice.reason
    assert not choice.cached
    if _kvm_device_usable():
        assert choice.probe_s is not None  # the KVM probe ran


@needs_qemu
def test_verdict_is_cached_and_reused_without_spawning(monkeypatch, tmp_path):
    first = accel.choose_accel()
    data = json.loads((tmp_path / "cache" / "accel.json").read_text())
    assert data["name"] == first.name

    def no_probe(*a, **kw):
        raise AssertionError("the probe ran again despite the cache")

    monkeypatch.setattr(accel, "run_probe", no_probe)
    monkeypatch.setattr(accel.process, "spawn", no_probe)
    # In-process memo.
    second = accel.choose_accel()
    assert (second.name, second.reason, second.cached) == (first.name, first.reason, True)
    # A new process: no memo, only the file.
    monkeypatch.setattr(accel, "_memo", {})
    third = accel.choose_accel()
    assert (third.name, third.cached) == (first.name, True)


@needs_qemu
def test_cache_for_another_boot_is_ignored(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "accel.json").write_text(json.dumps(
        {"key": "v1|some-other-boot|x", "name": "kvm", "reason": "stale", "probe_s": 0.01}))
    calls = []
    real = accel.run_probe
    monkeypatch.setattr(accel, "run_probe", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    choice = accel.choose_accel()
    assert calls, "a stale cache entry was trusted"
    assert choice.reason != "stale"


@needs_qemu
def test_kvm_timeout_gives_tcg_with_reason(monkeypatch):
    monkeypatch.setattr(accel, "_kvm_device_problem", lambda: None)
    real = accel.run_probe

    def fake(accel_name, **kw):
        if accel_name == "kvm":
            return accel.ProbeResult("kvm", finished=False, timed_out=True, elapsed_s=1.5,
                                     returncode=None, serial="S", stderr="")
        return real(accel_name, **kw)

    monkeypatch.setattr(accel, "run_probe", fake)
    choice = accel.choose_accel()
    assert choice.name == "tcg"
    assert "did not finish 20M iterations within 1.5 s" in choice.reason
    assert "VMLAB_ACCEL=kvm" in choice.reason
    assert choice.probe_s == 1.5


@needs_qemu
def test_fast_kvm_is_chosen(monkeypatch):
    monkeypatch.setattr(accel, "_kvm_device_problem", lambda: None)
    monkeypatch.setattr(accel, "run_probe", lambda a, **kw: accel.ProbeResult(
        a, finished=True, timed_out=False, elapsed_s=0.05, returncode=99, serial="SE", stderr=""))
    choice = accel.choose_accel()
    assert choice.name == "kvm" and choice.probe_s == 0.05


@needs_qemu
def test_no_kvm_device_gives_tcg_without_kvm_probe(monkeypatch, tmp_path):
    monkeypatch.setattr(accel, "_KVM_DEVICE", str(tmp_path / "no-kvm"))
    choice = accel.choose_accel()
    assert choice.name == "tcg"
    assert "does not exist" in choice.reason and choice.probe_s is None


@needs_qemu
def test_forced_tcg_skips_probe(monkeypatch):
    monkeypatch.setenv(accel.ACCEL_ENV, "tcg")
    monkeypatch.setattr(accel, "run_probe", lambda *a, **kw: pytest.fail("probe ran"))
    choice = accel.choose_accel()
    assert choice.name == "tcg" and "VMLAB_ACCEL=tcg" in choice.reason


@needs_qemu
def test_forced_kvm(monkeypatch, tmp_path):
    monkeypatch.setenv(accel.ACCEL_ENV, "kvm")
    monkeypatch.setattr(accel, "run_probe", lambda *a, **kw: pytest.fail("probe ran"))
    if _kvm_device_usable():
        assert accel.choose_accel().name == "kvm"
    monkeypatch.setattr(accel, "_KVM_DEVICE", str(tmp_path / "no-kvm"))
    with pytest.raises(EnvironmentProblem, match="VMLAB_ACCEL=kvm but KVM is unusable"):
        accel.choose_accel()


@needs_qemu
def test_forced_unknown_value(monkeypatch):
    monkeypatch.setenv(accel.ACCEL_ENV, "hvf")
    with pytest.raises(ConfigError, match="'kvm', 'tcg'"):
        accel.choose_accel()


def test_missing_qemu(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvironmentProblem, match="sudo apt-get install qemu-system-x86 qemu-utils"):
        accel.choose_accel()
