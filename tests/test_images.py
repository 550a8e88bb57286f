"""Images: the appliance recipe, its digest rule and cache, and (marked vm) a real boot.

The first run builds the appliance into the default cache root (a few seconds plus the package
download); later runs are served from the cache.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import bare_python
from vmlab.errors import ConfigError
from vmlab.images import BuiltImage, ImageKind, _table, appliance, debs, ensure_image, list_images
from vmlab.images.elf import ElfFile

needs_apt = pytest.mark.skipif(not shutil.which("apt-get") or not shutil.which("lz4"),
                               reason="building the appliance needs apt-get and lz4 (apt-get install lz4)")


@pytest.fixture(scope="module")
def image() -> BuiltImage:
    if not shutil.which("apt-get") or not shutil.which("lz4"):
        pytest.skip("building the appliance needs apt-get and lz4 (apt-get install lz4)")
    return ensure_image("appliance", progress=lambda *a: None)


def test_unknown_image_lists_known_names():
    with pytest.raises(ConfigError, match="appliance"):
        ensure_image("no-such-image")


def test_registry_rejects_duplicates():
    kind = ImageKind("x", "test", lambda **kw: None)
    with pytest.raises(ValueError, match="twice"):
        _table(kind, kind)
    assert "appliance" in [k.name for k in list_images()]


@needs_apt
def test_appliance_is_cached_and_stable(image, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a cached ensure_image() ran a command")

    monkeypatch.setattr(subprocess, "run", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    t0 = time.monotonic()
    again = ensure_image("appliance", progress=lambda *a: None)
    print(f"cached ensure_image: {1000 * (time.monotonic() - t0):.1f} ms")
    assert again == image
    assert re.fullmatch(r"[0-9a-f]{64}", image.digest)
    assert image.kernel.exists() and image.initrd.exists()
    assert image.initrd.read_bytes()[:6] == b"070701"  # uncompressed newc cpio
    assert "console=ttyS0" in image.kernel_args and image.memory_mb == 256
    assert image.os.startswith("Debian 12 appliance (kernel 6.1.0-")


@needs_apt
def test_kernel_is_pvh_bootable(image):
    assert ElfFile.read(image.kernel).has_pvh_note()


@needs_apt
def test_modules_follow_their_dependencies(image):
    meta = json.loads((image.kernel.parent / "image.json").read_text())
    order = meta["modules"]
    for before, after in [("virtio_ring", "virtio"), ("virtio", "virtio_pci"), ("net_failover", "virtio_net"),
                          ("failover", "net_failover"), ("vsock", "vmw_vsock_virtio_transport_common"),
                          ("vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport")]:
        assert order.index(before) < order.index(after), order
    assert "virtio_console" in order


def test_digest_follows_every_input(monkeypatch):
    sources = appliance.agent_sources()
    key = appliance.recipe_key(sources)
    assert appliance.recipe_key(dict(sources)) == key  # deterministic
    one_more_byte = dict(sources, **{"agent.py": sources["agent.py"] + b"\n"})
    assert appliance.recipe_key(one_more_byte) != key
    assert appliance.recipe_key(dict(sources, **{"init.sh": sources["init.sh"] + b" "})) != key
    assert appliance.recipe_key(sources, kernel_args=appliance.KERNEL_ARGS + " x") != key
    monkeypatch.setattr(appliance, "RECIPE_VERSION", appliance.RECIPE_VERSION + 1)
    assert appliance.recipe_key(sources) != key
    packages = {"libc6": {"version": "2.36-9", "sha256": "00" * 32}}
    newer = {"libc6": {"version": "2.36-10", "sha256": "00" * 32}}
    other_file = {"libc6": {"version": "2.36-9", "sha256": "11" * 32}}
    digests = {appliance.image_digest(key, p) for p in (packages, newer, other_file)}
    assert len(digests) == 3


@needs_apt
def test_changed_agent_builds_a_new_entry(image, tmp_path, monkeypatch):
    """A changed input gives a new digest and entry; the old entry of that cache is removed."""
    monkeypatch.setenv("VMLAB_CACHE", str(tmp_path))
    # Share the downloaded packages with the default cache instead of fetching them again.
    default_debs = Path(os.path.expanduser("~/.cache/vmlab/debs"))
    if os.environ.get("XDG_CACHE_HOME"):
        default_debs = Path(os.environ["XDG_CACHE_HOME"]) / "vmlab/debs"
    if default_debs.is_dir():
        (tmp_path / "debs").mkdir()
        for deb in default_debs.glob("*.deb"):
            os.link(deb, tmp_path / "debs" / deb.name) if deb.stat().st_dev == tmp_path.stat().st_dev \
                else shutil.copy(deb, tmp_path / "debs" / deb.name)
    first = ensure_image("appliance", progress=lambda *a: None)
    assert first.digest == image.digest  # same inputs, same digest, in another cache
    real = appliance.agent_sources()
    monkeypatch.setattr(appliance, "agent_sources",
                        lambda: dict(real, **{"agent.py": real["agent.py"] + b"\n# one more\n"}))
    second = ensure_image("appliance", progress=lambda *a: None)
    assert second.digest != first.digest
    assert second.initrd.exists() and not first.initrd.exists()  # the stale entry is gone


def test_missing_apt_lists_name_the_fix(monkeypatch):
    class Result:
        returncode, stderr = 0, ""
        stdout = "busybox-static:\n  Installed: (none)\n  Candidate: (none)\n"

    monkeypatch.setattr(debs, "_tool", lambda name: name)
    monkeypatch.setattr(debs.subprocess, "run", lambda *a, **k: Result())
    from vmlab.errors import ImageBuildError
    with pytest.raises(ImageBuildError, match="apt-get update"):
        debs.resolve_candidates(["busybox-static"])


# ---------------------------------------------------------------- boot

_RELAY = r"""
import selectors, socket, sys
# QEMU's guestfwd cmd: stdin/stdout are the guest's TCP connection; relay it to the test driver.
up = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
guest = socket.socket(fileno=0)
sel = selectors.DefaultSelector()
sel.register(guest, selectors.EVENT_READ, up)
sel.register(up, selectors.EVENT_READ, guest)
while True:
    for key, _ in sel.select():
        data = key.fileobj.recv(65536)
        if not data:
            sys.exit(0)
        key.data.sendall(data)
"""


def _first_status(server: socket.socket, result: dict) -> None:
    """Accept one agent connection, read its hello, ask GET /status."""
    try:
        conn, _ = server.accept()
        f = conn.makefile("rwb")
        hello = f.readline()
        result["hello_at"] = time.monotonic()
        result["hello"] = json.loads(hello.split(b" ", 2)[2])
        f.write(b"GET /status HTTP/1.1\r\nHost: agent\r\nContent-Length: 0\r\n\r\n")
        f.flush()
        assert f.readline().startswith(b"HTTP/1.1 200")
        length = 0
        while (line := f.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        result["status"] = json.loads(f.read(length))
        result["status_at"] = time.monotonic()
        conn.close()
    except Exception as err:  # reported by the test thread
        result["error"] = err


@pytest.mark.vm
def test_appliance_boots_to_agent(image, tmp_path):
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("needs qemu-system-x86_64 (apt-get install qemu-system-x86)")
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(90)
    relay = tmp_path / "relay.py"
    relay.write_text(_RELAY)
    result: dict = {}
    threading.Thread(target=_first_status, args=(server, result), daemon=True).start()
    console = tmp_path / "console.log"
    # restrict=on: the guest reaches only slirp's DHCP/DNS and the guestfwd driver address.
    netdev = (f"user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:8008-cmd:{sys.executable} {relay} "
              f"{server.getsockname()[1]}")
    argv = [qemu, "-accel", "tcg", "-machine", "pc", "-m", str(image.memory_mb), "-nodefaults",
            "-no-user-config", "-display", "none", "-no-reboot", "-serial", f"file:{console}",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", f"{image.kernel_args} vmlab.hostname=bootie vmlab.driver=10.0.2.100:8008",
            "-device", "virtio-net-pci,netdev=n0,mac=52:cc:cc:cc:00:01,romfile=", "-netdev", netdev]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marks: dict[str, float] = {}
    try:
        deadline = t0 + 90
        while time.monotonic() < deadline and "status" not in result and "error" not in result:
            text = console.read_text(errors="replace") if console.exists() else ""
            for marker in ("vmlab-init: starting agent", "vmlab-agent: eth0 bound"):
                if marker in text and marker not in marks:
                    marks[marker] = time.monotonic() - t0
            if proc.poll() is not None:
                pytest.fail(f"QEMU exited {proc.returncode}: {proc.stdout.read().decode()}\n{text}")
            time.sleep(0.02)
        text = console.read_text(errors="replace")
        assert "error" not in result, f"{result['error']!r}\n{text}"
        assert "status" in result, f"no agent answered within 90 s; console:\n{text}"
        # restrict=on makes slirp offer no router, hence "via none".
        assert "vmlab-agent: eth0 bound 10.0.2.15/24 via none" in text
        assert result["hello"]["mac"] == "52:cc:cc:cc:00:01"
        assert result["hello"]["hostname"] == "bootie"
        status = result["status"]
        eth0 = next(i for i in status["interfaces"] if i["name"] == "eth0")
        assert eth0["ipv4"] == ["10.0.2.15/24"] and eth0["up"]
        assert status["os"] == image.os
        print("\nboot timings (s from QEMU start): " + ", ".join(f"{k!r} {v:.2f}" for k, v in marks.items())
              + f", hello {result['hello_at'] - t0:.2f}, /status answered {result['status_at'] - t0:.2f}")
    finally:
        proc.kill()
        proc.wait(10)
        server.close()


def test_image_ls_puts_each_entry_under_its_own_kind(tmp_path, monkeypatch, capsys):
    """`debian-cloud-qcow2-*` (the local cloud build) is not a debian image."""
    from vmlab import cli
    monkeypatch.setenv("VMLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "250")
    images = tmp_path / "images"
    for name in ("debian-0db34da3ec44", "debian+1a2b3c4d-0db34da3ec44",
                 "debian-cloud-qcow2-ba971b793ed3", "cloud+87a24bc4e4b4-1baf617ffe97",
                 ".build-debian-xyz"):
        (images / name).mkdir(parents=True)
    assert cli.main(["image", "ls"]) == 0
    rows: dict[str, str] = {}
    kind = None
    for line in capsys.readouterr().out.splitlines():
        if line.count("│") >= 3:  # a table line; an empty first cell continues the row above
            kind = line.split("│")[1].strip() or kind
            rows[kind] = rows.get(kind, "") + line
    assert "debian-0db34da3ec44" in rows["debian"] and "debian+1a2b3c4d" in rows["debian"]
    assert "cloud-qcow2" not in rows["debian"]
    assert "cloud+87a24bc4e4b4" in rows["cloud"] and "debian-cloud-qcow2-ba971b793ed3" in rows["cloud"]
    assert ".build" not in "".join(rows.values())


def _published(tmp_path: Path, name: str, digest: str, content: str, *, replace: bool) -> Path:
    from vmlab.images import cache
    with cache.building(name) as tmp:
        (tmp / "entry").mkdir()
        (tmp / "entry" / "disk").write_text(content)
        (tmp / "entry" / "image.json").write_text("{}")
        return cache.publish(tmp, name, digest, replace=replace)


def test_a_forced_rebuild_replaces_the_entry_and_the_snapshots_made_on_it(tmp_path, monkeypatch):
    """Same inputs, same digest, but a forced rebuild may hold other bytes (debootstrap takes
    what the mirror serves): it must take the entry's place, not be dropped, and snapshots
    whose frozen disks were made on the old bytes must go with it."""
    from vmlab.snapshot import cache as S
    monkeypatch.setenv("VMLAB_CACHE", str(tmp_path))
    digest = "d" * 64
    entry = _published(tmp_path, "debian", digest, "first", replace=False)
    snaps = S.snapshots_dir()
    for key, meta in {"on-it": {"image": "debian", "image_digest": digest},
                      "other": {"image": "debian", "image_digest": "e" * 64}}.items():
        (snaps / key).mkdir()
        (snaps / key / S.META_FILE).write_text(json.dumps(meta))
    # A concurrent publisher of the same digest keeps the first one, snapshots and all.
    assert _published(tmp_path, "debian", digest, "racer", replace=False) == entry
    assert (entry / "disk").read_text() == "first" and (snaps / "on-it").is_dir()
    assert _published(tmp_path, "debian", digest, "forced", replace=True) == entry
    assert (entry / "disk").read_text() == "forced"
    assert not (snaps / "on-it").exists() and (snaps / "other").is_dir()
    assert not [p for p in (tmp_path / "images").iterdir() if p.name.startswith(".build-")]


def test_a_root_built_key_the_user_cannot_read_is_named_not_retried(tmp_path):
    """An image built with sudo leaves root's 0600 SSH key; ssh would exit 255 ("not up
    yet") for minutes. The cause and the fix are named at once instead. As root, the check
    runs in a child dropped to nobody (root reads every file)."""
    key = tmp_path / "images" / "debian-x" / "ssh_key"
    key.parent.mkdir(parents=True)
    key.write_text("k")
    key.chmod(0o600)
    python, package = sys.executable, bare_python.PACKAGE
    if os.geteuid() == 0:
        if not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"):
            pytest.skip("root without setpriv or /usr/bin/python3: cannot run as another user")
        for d in (tmp_path, key.parent.parent, key.parent):
            d.chmod(0o755)
        for d in tmp_path.parents:  # pytest's base directory is 0700
            if str(d) == tempfile.gettempdir():
                break
            d.chmod(d.stat().st_mode | 0o111)
        # nobody may not reach the checkout (a mktemp -d clone is 0700) nor the venv's
        # interpreter: a copy of the sources and the system python, both world-readable.
        package = tmp_path / "src" / "vmlab"
        shutil.copytree(bare_python.PACKAGE, package,
                        ignore=shutil.ignore_patterns("__pycache__"))
        for d in (tmp_path / "src", package):
            d.chmod(0o755)
        python = "/usr/bin/python3"
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    else:
        key.chmod(0)
        drop = []
    out = bare_python.run(python,
                          "from pathlib import Path; from vmlab.vm.ssh import SshTarget\n"
                          "try:\n    SshTarget(2222, Path(sys.argv[1])).argv('true')\n"
                          "except Exception as err:\n    print(type(err).__name__, err)\n",
                          str(key), subpackages=("vm",), prefix=tuple(drop), package=package)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("EnvironmentProblem"), out.stdout
    assert "not readable by this user" in out.stdout and "chown" in out.stdout


def test_sudo_builds_give_the_cache_back_to_the_invoking_user(tmp_path, monkeypatch):
    from vmlab.paths import give_back_to_sudo_user
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    monkeypatch.setenv("VMLAB_CACHE", str(tmp_path / "c"))
    entry = tmp_path / "c" / "images" / "debian-x"
    entry.mkdir(parents=True)
    (entry / "ssh_key").write_text("k")
    (entry / "link").symlink_to("/etc/passwd")
    os.chown(tmp_path / "c", 4242, 4242)
    monkeypatch.setenv("SUDO_UID", "4242")
    monkeypatch.setenv("SUDO_GID", "4243")
    give_back_to_sudo_user(tmp_path / "c")
    assert (entry / "ssh_key").stat().st_uid == 4242 and (entry / "ssh_key").stat().st_gid == 4243
    assert os.lstat(entry / "link").st_uid == 4242 and os.stat("/etc/passwd").st_uid == 0
    # Not the invoking user's cache (root's own, say): left alone.
    os.chown(tmp_path / "c", 0, 0)
    (entry / "new").write_text("n")
    give_back_to_sudo_user(tmp_path / "c")
    assert (entry / "new").stat().st_uid == 0


def test_a_cancelled_ssh_command_leaves_no_ssh_client_behind(tmp_path, monkeypatch):
    """The preparation cancels SSH commands when QEMU exits or time runs out. `ssh` here is a
    stand-in script that hangs like a client whose guest stopped answering."""
    import asyncio
    from vmlab.vm.ssh import SshTarget
    pidfile = tmp_path / "pid"
    fake = tmp_path / "bin" / "ssh"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    key = tmp_path / "key"
    key.write_text("k")

    async def main():
        task = asyncio.ensure_future(SshTarget(2222, key).run("true"))
        while not pidfile.exists() or not pidfile.read_text().strip():
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return int(pidfile.read_text())

    pid = asyncio.run(asyncio.wait_for(main(), 20))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
