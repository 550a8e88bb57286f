"""The snapshot cache: keys, staleness, atomic publishing, fallbacks, and restored nodes."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vmlab import Env
from vmlab.images import BuiltImage, ensure_image
from vmlab.paths import cache_root
from vmlab.snapshot import cache as C
from vmlab.snapshot import ensure_snapshot
from vmlab.vm.accel import qemu_binary


def _fake_image(digest="a" * 64, name="appliance") -> BuiltImage:
    return BuiltImage(name=name, digest=digest, kernel=Path("/k/vmlinux"), initrd=Path("/k/i.cpio"),
                      kernel_args="console=ttyS0", os="test")


def _spec(image=None, **kw) -> C.SnapshotSpec:
    args = dict(image=image or _fake_image(), nics=1, memory_mb=256, accel="tcg", qemu=qemu_binary())
    args.update(kw)
    return C.SnapshotSpec(**args)


# --------------------------------------------------------------------------- keys (no VM)

def test_key_names_image_digest_and_code_version():
    key = _spec().key
    assert key.startswith(f"appliance-{'a' * 12}-v{C.SNAPSHOT_CODE_VERSION}-")


def test_key_changes_with_code_version_and_digest(monkeypatch):
    base = _spec().key
    assert _spec(image=_fake_image(digest="b" * 64)).key != base
    monkeypatch.setattr(C, "SNAPSHOT_CODE_VERSION", C.SNAPSHOT_CODE_VERSION + 1)
    assert _spec().key != base


@pytest.mark.parametrize("change", [dict(memory_mb=512), dict(nics=2), dict(accel="kvm")],
                         ids=["ram", "nics", "accel"])
def test_fingerprint_covers_what_makes_a_state_unrestorable(change):
    assert _spec(**change).key != _spec().key


def _entry(root: Path, key: str, **meta) -> None:
    (root / key).mkdir()
    (root / key / C.META_FILE).write_text(json.dumps(meta))


def test_stale_entries_of_the_same_image_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("VMLAB_CACHE", str(tmp_path))
    root = C.snapshots_dir()
    spec = _spec()
    shape = dict(nics=1, memory_mb=256, accel="tcg")
    _entry(root, spec.key, **shape)
    _entry(root, f"appliance-{'b' * 12}-v0-{'c' * 12}", **shape)   # older digest, same shape
    _entry(root, f"debian-{'a' * 12}-v1-{'c' * 12}", **shape)      # another image
    dead = root / f".tmp-{spec.key}-999999999-1"
    dead.mkdir()
    removed = C.remove_stale(spec, spec.key)
    assert sorted(removed) == sorted([f"appliance-{'b' * 12}-v0-{'c' * 12}", dead.name])
    assert sorted(p.name for p in root.iterdir() if p.name != ".locks") == sorted(
        [spec.key, f"debian-{'a' * 12}-v1-{'c' * 12}"])


def test_entries_of_another_shape_or_name_are_siblings_not_stale(tmp_path, monkeypatch):
    """Two node groups of one image (1 NIC and 2 NICs, or another RAM size) are prepared one
    after the other in the same Env: the second must not delete the first's entry, already
    handed out; nor may `web` take `web-2`'s entries for its own."""
    monkeypatch.setenv("VMLAB_CACHE", str(tmp_path))
    root = C.snapshots_dir()
    one = _spec(image=_fake_image(name="web"))
    two_nics = _spec(image=_fake_image(name="web"), nics=2)
    more_ram = _spec(image=_fake_image(name="web"), memory_mb=512)
    other = _spec(image=_fake_image(name="web-2"))
    for spec in (one, two_nics, more_ram, other):
        _entry(root, spec.key, nics=spec.nics, memory_mb=spec.memory_mb, accel=spec.accel)
    assert C.remove_stale(two_nics, two_nics.key) == []
    assert C.remove_stale(one, one.key) == []
    assert C.entry_name(other.key) == "web-2" and C.entry_name("web-junk") is None
    assert all((root / s.key).is_dir() for s in (one, two_nics, more_ram, other))


def test_failed_prepare_leaves_no_entry(tmp_path, monkeypatch):
    import asyncio
    import vmlab.snapshot as S
    monkeypatch.setenv("VMLAB_CACHE", str(tmp_path))
    spec = _spec()

    async def broken_prepare(spec, out_dir, progress):
        (out_dir / C.STATE_FILE).write_bytes(b"half")
        raise RuntimeError("killed half-way")

    monkeypatch.setattr(S, "prepare", broken_prepare)
    with pytest.raises(RuntimeError):
        asyncio.run(ensure_snapshot(spec, lambda m: None))
    assert C.find(spec.key) is None
    assert [p.name for p in C.snapshots_dir().iterdir() if p.name != ".locks"] == []


def test_entry_problems_are_detected(tmp_path):
    entry = C.SnapshotEntry(tmp_path)
    assert "unreadable" in entry.problem()
    (tmp_path / C.STATE_FILE).write_bytes(b"state")
    (tmp_path / C.RAM_FILE).write_bytes(b"\0" * 10)
    import hashlib
    meta = {"state_sha256": hashlib.sha256(b"state").hexdigest(), "ram_bytes": 10}
    (tmp_path / C.META_FILE).write_text(json.dumps(meta))
    assert entry.problem() is None
    (tmp_path / C.STATE_FILE).write_bytes(b"stat")  # truncated
    assert "checksum" in entry.problem()
    (tmp_path / C.STATE_FILE).write_bytes(b"state")
    (tmp_path / C.RAM_FILE).write_bytes(b"\0" * 9)
    assert "RAM file" in entry.problem()
    (tmp_path / C.RAM_FILE).write_bytes(b"\0" * 10)
    entry.mark_bad("because")
    assert "marked bad: because" in entry.problem()


# --------------------------------------------------------------------------- VM tests

@pytest.fixture
def isolated_snapshots(tmp_path, monkeypatch):
    """A cache root of its own for snapshots, sharing the built images (and the accelerator
    verdict) with the real cache, so a test can break or empty the snapshot cache."""
    ensure_image("appliance")
    real = cache_root()
    root = tmp_path / "cache"
    root.mkdir()
    for name in ("images", "debs", "accel.json", "appliance.resolved.json"):
        if (real / name).exists():
            (root / name).symlink_to(real / name)
    monkeypatch.setenv("VMLAB_CACHE", str(root))
    return root


@pytest.mark.vm
def test_restored_nodes_get_their_own_identity_clock_and_randomness():
    with Env(name="restore") as env:
        net = env.add_network(wan_ip="2.1.1.1", lan="192.168.1.0/24")
        a = env.add_node(net, name="a")
        b = env.add_node(net, name="b")
        env.start()
        for node in (a, b):
            assert node.boot_mode == "restore", node.fallback_reason
            st = node.status()
            eth0 = [i for i in st["interfaces"] if i["name"] == "eth0"][0]
            assert eth0["mac"] == node.mac and f"{node.lan_ip()}/24" in eth0["ipv4"]
            assert st["hostname"] == node.name
            assert node.name in node.exec("cat /etc/hosts").stdout.split()
            assert abs(st["time"] - time.time()) < 2.0, "guest clock not set after restore"
        assert a.mac != b.mac
        assert a.ping(b.lan_ip()).ok  # and they reach each other on the LAN
        rand = [n.exec("head -c 16 /dev/urandom | od -An -tx1", check=True).stdout for n in (a, b)]
        assert rand[0] != rand[1], "clones share their random stream"


@pytest.mark.vm
def test_corrupted_state_falls_back_to_cold_boot_and_is_rebuilt(isolated_snapshots):
    with Env(name="prime") as env:
        env.add_node(env.add_network(wan_ip="2.1.1.1"))
        env.start()
    [(entry, meta, problem)] = C.list_entries()
    assert problem is None
    data = bytearray(entry.state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.state.write_bytes(bytes(data))
    with Env(name="fallback") as env:
        node = env.add_node(env.add_network(wan_ip="2.1.1.1"))
        env.start()
        assert node.boot_mode == "cold"
        assert "checksum" in node.fallback_reason
        assert node.exec("echo alive", check=True).stdout == "alive\n"
    assert "marked bad" in C.SnapshotEntry(entry.path).problem()
    with Env(name="rebuilt") as env:  # the bad entry is replaced, and serves again
        node = env.add_node(env.add_network(wan_ip="2.1.1.1"))
        env.start()
        assert node.boot_mode == "restore", node.fallback_reason


@pytest.mark.vm
def test_state_qemu_cannot_load_falls_back(isolated_snapshots):
    with Env(name="prime") as env:
        env.add_node(env.add_network(wan_ip="2.1.1.1"))
        env.start()
    [(entry, meta, _)] = C.list_entries()
    # Truncate the state *and* fix up its checksum: only QEMU can tell it is broken now.
    import hashlib
    data = entry.state.read_bytes()[:1000]
    entry.state.write_bytes(data)
    meta["state_sha256"] = hashlib.sha256(data).hexdigest()
    (entry.path / C.META_FILE).write_text(json.dumps(meta))
    with Env(name="fallback") as env:
        node = env.add_node(env.add_network(wan_ip="2.1.1.1"))
        env.start()
        assert node.boot_mode == "cold" and node.fallback_reason
        assert node.exec("true").exit_code == 0


PREPARER = textwrap.dedent("""
    import sys
    from vmlab import Env
    env = Env(name=sys.argv[1], progress=lambda m: print(m, flush=True))
    env.add_node(env.add_network(wan_ip="2.1.1.1"))
    env.start()
    print("MODE", env.nodes[0].boot_mode, flush=True)
    env.close()
""")


@pytest.mark.vm
def test_two_processes_on_an_empty_cache_prepare_once(isolated_snapshots):
    procs = [subprocess.Popen([sys.executable, "-c", PREPARER, f"p{i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
             for i in range(2)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    prepared = sum(out.count("booting the image") for out in outputs)
    assert prepared == 1, outputs
    assert all("MODE restore" in out for out in outputs), outputs


@pytest.mark.vm
def test_prepare_killed_half_way_leaves_nothing_usable(isolated_snapshots):
    # TMPDIR: the killed process cannot remove its run dirs; let pytest's tmp_path hold them.
    proc = subprocess.Popen([sys.executable, "-c", PREPARER, "victim"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TMPDIR": str(isolated_snapshots.parent)})
    for line in proc.stdout:
        if "booting the image" in line:
            time.sleep(1.0)  # QEMU is up and writing the RAM file
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    root = C.snapshots_dir()
    leftovers = [p for p in root.iterdir() if p.name != ".locks"]
    assert all(p.name.startswith(".tmp-") for p in leftovers), leftovers
    assert not any(e.problem() is None for e, _, _ in C.list_entries())
    with Env(name="after") as env:  # a later run prepares afresh and cleans up
        node = env.add_node(env.add_network(wan_ip="2.1.1.1"))
        env.start()
        assert node.boot_mode == "restore"
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_disk_image_key_changes_with_the_agent_it_installs(monkeypatch):
    # The agent goes into a disk image at preparation time, so it must be part of the key;
    # the appliance's agent is already inside its image digest.
    import importlib
    P = importlib.import_module("vmlab.snapshot.prepare")  # the module, not the function
    disk_image = dataclasses.replace(_fake_image(name="debian"), disk=Path("/d/disk.qcow2"))
    before = _spec(image=disk_image).key
    real = P.agent_files

    def changed(image=None):
        files = dict(real(image))
        data, mode = files["/vmlab/agent.py"]
        files["/vmlab/agent.py"] = (data + b"\n# changed\n", mode)
        return files

    monkeypatch.setattr(P, "agent_files", changed)
    assert _spec(image=disk_image).key != before
    assert _spec().key == _spec().key  # the appliance key does not depend on it


def test_a_cloud_images_own_busybox_is_installed_with_the_agent_and_keyed(tmp_path):
    from vmlab.snapshot.prepare import agent_files
    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELF one")
    cloud_image = dataclasses.replace(_fake_image(name="cloud+ab"), disk=Path("/d/disk.qcow2"),
                                      agent_busybox=bb)
    assert agent_files(cloud_image)["/vmlab/bin/busybox"] == (b"\x7fELF one", 0o755)
    assert "/vmlab/bin/busybox" not in agent_files(_fake_image(name="debian"))
    before = _spec(image=cloud_image).key
    bb.write_bytes(b"\x7fELF two")
    assert _spec(image=cloud_image).key != before


def test_an_overlay_that_cannot_be_made_is_a_failed_restore_not_a_crash(tmp_path):
    """Env falls back on RestoreFailed only; a qemu-img error escaped it."""
    import asyncio
    from vmlab.snapshot.restore import RestoreFailed, restore
    image = dataclasses.replace(_fake_image(name="debian"), disk=tmp_path / "base.qcow2",
                                kind="debian")
    entry_dir = tmp_path / "entry"
    entry_dir.mkdir()
    (entry_dir / C.DISK_FILE).write_bytes(b"not a qcow2")
    with pytest.raises(RestoreFailed, match="qemu-img") as failed:
        asyncio.run(restore(_spec(image=image), C.SnapshotEntry(entry_dir), name="n",
                            run_dir=tmp_path, nic_sockets=[], hostchan=tmp_path / "h"))
    assert not failed.value.state_broken


def test_preparation_takes_another_ssh_port_when_its_free_port_was_taken_meanwhile(
        tmp_path, monkeypatch):
    """A real QEMU on an empty disk (its firmware finds nothing to boot: enough to bind the
    forward). The first port is bound by someone else first, as can happen between
    free_port() and QEMU's bind; SSH is stopped right after the start, with the port it got."""
    import asyncio
    import importlib
    import socket
    P = importlib.import_module("vmlab.snapshot.prepare")  # the package exports a function of that name
    disk = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    image = BuiltImage(name="cloud+x", digest="c" * 64, kernel=None, initrd=None, kernel_args="",
                       os="test", disk=disk, ssh_key=tmp_path / "key", kind="cloud")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    ports = iter([taken.getsockname()[1], free])
    monkeypatch.setattr(P, "free_port", lambda: next(ports))
    used = []

    class Stop(Exception):
        pass

    async def wait_up(self, timeout_s, *, what="ssh"):
        used.append(self.port)
        raise Stop

    monkeypatch.setattr(P.SshTarget, "wait_up", wait_up)
    out = tmp_path / "out"
    out.mkdir()
    try:
        with pytest.raises(Stop):
            asyncio.run(P.prepare(_spec(image=image, memory_mb=64), out, lambda m: None))
    finally:
        taken.close()
    assert used == [free]
