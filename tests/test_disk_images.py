"""Unit tests for disk images (debian, cloud), their snapshot keys, provisioning, files to and
from nodes, and vnet's own echo requests (lan_ping). No VM boots here."""
from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

import bare_python
from vmlab import ConfigError, Env, ImageSpec, Provision
from vmlab.agent.agent import AgentHandler, BadRequest
from vmlab.errors import ImageBuildError
from vmlab.files import pack, unpack
from vmlab.images import BuiltImage
from vmlab.images import cloud, debian
from vmlab.snapshot.cache import SnapshotSpec
from vmlab.vm.qemu import PrepNic, VmConfig, build_argv

from vmlab.vnet.core import node_mac


def mac(n: int) -> str:
    return node_mac(n, 0)


# ---------------------------------------------------------------- image specs

def test_image_spec_names_and_validation():
    assert ImageSpec("debian").name == "debian"
    with_pkgs = ImageSpec("debian", packages=("curl", "jq", "curl"))
    assert with_pkgs.packages == ("curl", "jq")
    assert with_pkgs.name.startswith("debian+") and with_pkgs.name != "debian"
    assert ImageSpec("debian", packages=("jq", "curl")).name == with_pkgs.name
    assert ImageSpec("cloud", url="file:///x.qcow2", sha256="ab" * 32).name == "cloud+" + "ab" * 6
    with pytest.raises(ConfigError, match="known images"):
        ImageSpec("windows")
    with pytest.raises(ConfigError, match="takes no packages"):
        ImageSpec("appliance", packages=("curl",))
    with pytest.raises(ConfigError, match="needs url"):
        ImageSpec("cloud")


def test_debian_recipe_key_follows_packages_and_masks():
    assert debian.recipe_key(()) != debian.recipe_key(("curl",))
    assert debian.recipe_key(("curl",)) == debian.recipe_key(("curl",))
    with pytest.raises(ConfigError, match="not Debian package names"):
        debian.ensure(packages=("curl; rm -rf /",))


def test_debian_configure_masks_units_and_installs_key_and_prep_net(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\ndaemon:*:19000::::::\n")
    (root / "usr/local/sbin").mkdir(parents=True)
    debian._configure(root, "ssh-ed25519 AAAA test\n", "Debian 12 test")
    masked = root / "etc/systemd/system/systemd-journald.service"
    assert masked.is_symlink() and os.readlink(masked) == "/dev/null"
    assert all((root / "etc/systemd/system" / u).is_symlink() for u in debian.MASKED_UNITS)
    assert (root / "etc/shadow").read_text().startswith("root::19000")
    assert (root / "root/.ssh/authorized_keys").read_text() == "ssh-ed25519 AAAA test\n"
    assert (root / "etc/systemd/system/multi-user.target.wants/vmlab-prep-net.service").is_symlink()
    script = (root / "usr/local/sbin/vmlab-prep-net").read_text()
    assert debian.PREP_MAC in script and "route" not in script  # address only, no default route
    assert (root / "vmlab/os").read_text() == "Debian 12 test\n"


# ---------------------------------------------------------------- QEMU command line

def _cfg(**kw) -> VmConfig:
    return VmConfig(name="n", run_dir=Path("/tmp/r"), kernel=Path("/k"), **kw)


def test_argv_disk_seed_and_prep_nic_forms():
    prep = build_argv(_cfg(disk=Path("/d.qcow2"), seed=Path("/s.iso"),
                           prep_nic=PrepNic("52:cc:cc:cc:fe:00", 2222)))
    line = " ".join(prep)
    assert "-drive if=none,id=disk0,file=/d.qcow2,format=qcow2,cache=unsafe" in line
    assert "virtio-blk-pci,drive=disk0" in line
    assert "file=/s.iso,format=raw,readonly=on" in line
    assert "user,id=prep,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22" in line
    restore = " ".join(build_argv(_cfg(disk=Path("/d.qcow2"), seed=Path("/s.iso"),
                                       prep_nic=PrepNic("52:cc:cc:cc:fe:00", None))))
    # the restore form keeps the device and netdev kind (a saved state needs them), no forward
    assert "user,id=prep,restrict=on " in restore + " " and "hostfwd" not in restore
    assert restore.index("disk0") < restore.index("seed0") < restore.index("prepnic")
    with pytest.raises(ConfigError, match="must not contain ','"):
        build_argv(_cfg(disk=Path("/a,b.qcow2")))


def _image(tmp_path, name="debian", **kw) -> BuiltImage:
    defaults = dict(name=name, digest="d" * 64, kernel=tmp_path / "vmlinux",
                    initrd=tmp_path / "initrd", kernel_args="console=ttyS0", os="Debian",
                    disk=tmp_path / "disk.qcow2", ssh_key=tmp_path / "key", kind="debian")
    defaults.update(kw)
    return BuiltImage(**defaults)


def test_snapshot_key_ignores_paths_and_port_but_not_provision(tmp_path, monkeypatch):
    monkeypatch.setattr("vmlab.snapshot.cache.qemu_version", lambda q: "QEMU 7.2")
    spec = SnapshotSpec(_image(tmp_path), 1, 256, "tcg", "qemu")
    other_place = SnapshotSpec(_image(tmp_path / "elsewhere"), 1, 256, "tcg", "qemu")
    assert spec.key == other_place.key and spec.key.startswith("debian-dddddddddddd-v")
    prov = Provision("web", commands=["true"])
    provisioned = SnapshotSpec(_image(tmp_path), 1, 256, "tcg", "qemu", provision=prov)
    assert provisioned.key.startswith("debian+web-") and provisioned.key != spec.key
    changed = SnapshotSpec(_image(tmp_path), 1, 256, "tcg", "qemu",
                           provision=Provision("web", commands=["false"]))
    assert changed.key != provisioned.key
    a = spec.vm_config(name="a", run_dir=tmp_path, ram=tmp_path / "r", shared=True,
                       incoming=False, disk=tmp_path / "x.qcow2", ssh_port=4000)
    assert a.prep_nic == PrepNic(debian.PREP_MAC, 4000) and a.disk == tmp_path / "x.qcow2"
    with pytest.raises(ValueError, match="pass disk="):
        spec.vm_config(name="a", run_dir=tmp_path, ram=tmp_path / "r", shared=True, incoming=False)
    appliance = SnapshotSpec(_image(tmp_path, "appliance", disk=None, kind="appliance"), 1, 256,
                             "tcg", "qemu")
    cfg = appliance.vm_config(name="a", run_dir=tmp_path, ram=tmp_path / "r", shared=True,
                              incoming=False)
    assert cfg.disk is None and cfg.prep_nic is None


def test_only_a_networked_provisioning_step_lifts_the_prep_nics_restriction(tmp_path, monkeypatch):
    """network=True opens QEMU's NAT while the step runs; the restore form of the same
    config never has it, and the flag joins the key through the provision digest."""
    monkeypatch.setattr("vmlab.snapshot.cache.qemu_version", lambda q: "QEMU 7.2")
    closed = SnapshotSpec(_image(tmp_path), 1, 256, "tcg", "qemu",
                          provision=Provision("web", commands=["true"]))
    opened = SnapshotSpec(_image(tmp_path), 1, 256, "tcg", "qemu",
                          provision=Provision("web", commands=["true"], network=True))
    assert opened.key != closed.key
    kw = dict(name="a", run_dir=tmp_path, ram=tmp_path / "r", shared=True, incoming=False,
              disk=tmp_path / "x.qcow2")

    def netdev(spec, **more):
        return " ".join(build_argv(spec.vm_config(**kw, **more), qemu="qemu"))

    assert "user,id=prep,restrict=off,hostfwd=tcp:127.0.0.1:4000-:22" in netdev(opened, ssh_port=4000)
    assert "restrict=on,hostfwd" in netdev(closed, ssh_port=4000)
    assert "user,id=prep,restrict=on " in netdev(opened) + " "  # restore: no port, no outside


# ---------------------------------------------------------------- provisioning

def test_provision_digest_covers_files_and_commands(tmp_path):
    d = tmp_path / "tree"
    (d / "x").mkdir(parents=True)
    (d / "x" / "f").write_text("1")
    p1 = Provision("p", commands=["a", "b"], files={"/opt/t": d, "/etc/y": "text"})
    assert set(p1.guest_files()) == {"/opt/t/x/f", "/etc/y"}
    assert Provision("p", commands=["a", "b"], files={"/opt/t": d, "/etc/y": "text"}).digest \
        == p1.digest
    assert Provision("p", commands=["b", "a"], files={"/opt/t": d, "/etc/y": "text"}).digest \
        != p1.digest
    (d / "x" / "f").write_text("2")
    assert Provision("p", commands=["a", "b"], files={"/opt/t": d, "/etc/y": "text"}).digest \
        != p1.digest
    with pytest.raises(ConfigError, match="absolute path"):
        Provision("p", files={"etc/x": "y"})
    with pytest.raises(ConfigError, match="list of command lines"):
        Provision("p", commands="apt-get install x")
    with pytest.raises(ConfigError, match="1-32"):
        Provision("Bad Name")


def test_env_rejects_provisioning_the_appliance_and_accepts_specs():
    env = Env(name="t")
    lan = env.add_network(wan_ip="2.1.1.1")
    with pytest.raises(ConfigError, match="cannot be provisioned"):
        env.add_node(lan, image="appliance", provision=Provision("p"))
    node = env.add_node(lan, image=ImageSpec("debian", packages=("curl",)), no_agent=True)
    assert node.image.startswith("debian+") and node.no_agent
    assert env._needs_snapshot(node)  # a disk image's agent lives in its snapshot


def test_a_nodes_ram_defaults_to_what_its_image_asks_for():
    """A cloud image said 512 MB while every node got add_node's 256."""
    from vmlab.images import cloud as cloud_kind
    env = Env(name="t")
    lan = env.add_network(wan_ip="2.1.1.1")
    cloud_node = env.add_node(lan, image=ImageSpec("cloud", url="file:///x.qcow2", sha256="a" * 64))
    assert cloud_node.memory_mb == cloud_kind.MEMORY_MB == 512
    assert env.add_node(lan).memory_mb == 256
    assert env.add_node(lan, image="debian", memory_mb=1024).memory_mb == 1024
    assert env._snapshot_group(cloud_node)[2] == 512
    with pytest.raises(ConfigError, match="memory_mb"):
        env.add_node(lan, memory_mb=16)


# ---------------------------------------------------------------- cloud images

def _qcow2(tmp_path) -> Path:
    path = tmp_path / "small.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


def test_cloud_fetch_verifies_sha256_and_never_keeps_a_mismatch(tmp_path):
    src = _qcow2(tmp_path)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "out.qcow2"
    assert cloud.fetch_verified(src.as_uri(), good, dest) == src.stat().st_size
    assert dest.read_bytes() == src.read_bytes()
    bad = tmp_path / "bad.qcow2"
    with pytest.raises(ImageBuildError, match="was not used"):
        cloud.fetch_verified(src.as_uri(), "0" * 64, bad)
    assert not bad.exists()
    with pytest.raises(ConfigError, match="https:// or file://"):
        cloud.fetch_verified("http://example.com/x.qcow2", good, bad)


def test_cloud_image_entry_has_disk_key_and_a_nocloud_seed(tmp_path, monkeypatch):
    import pycdlib
    monkeypatch.setenv("VMLAB_CACHE", str(tmp_path / "cache"))
    src = _qcow2(tmp_path)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    with pytest.raises(ImageBuildError, match="was not used"):
        cloud.ensure(url=src.as_uri(), sha256="f" * 64)
    image = cloud.ensure(url=src.as_uri(), sha256=sha)
    assert image.kernel is None and image.disk.read_bytes() == src.read_bytes()
    assert image.name == f"cloud+{sha[:12]}" and image.seed.exists() and image.ssh_key.exists()
    iso = pycdlib.PyCdlib()
    iso.open(str(image.seed))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        read = {}
        for name in ("user-data", "meta-data", "network-config"):
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, rr_path=f"/{name}")
            read[name] = buf.getvalue().decode()
    finally:
        iso.close()
    pub = Path(str(image.ssh_key) + ".pub").read_text().strip()
    assert read["user-data"].startswith("#cloud-config") and pub in read["user-data"]
    assert "instance-id:" in read["meta-data"]
    assert debian.PREP_MAC in read["network-config"]
    assert cloud.ensure(url=src.as_uri(), sha256=sha) == image  # cached: same entry
    # The agent's own busybox (a cloud image may have none): Debian's static build, with
    # the applets the agent uses.
    applets = subprocess.run([str(image.agent_busybox), "--list"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert {"udhcpc", "ping", "ip", "sh"} <= set(applets)


# ---------------------------------------------------------------- files

def test_pack_unpack_file_and_folder(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_text("hi")
    (src / "top").write_bytes(b"\x00\x01")
    dest, b64 = pack(src, "/opt/app/")
    assert dest == "/opt/app"
    guest = tmp_path / "guest"
    AgentHandler.do_files_put(None, {"path": str(guest / "opt/app"), "tar_b64": b64})
    assert (guest / "opt/app/d/f.txt").read_text() == "hi"
    dest, b64 = pack(src / "top", "/etc/top.bin")
    assert dest == "/etc"
    got = AgentHandler.do_files_get(None, {"path": str(guest / "opt/app")})
    back = unpack(got["tar_b64"], tmp_path / "back")
    assert (back / "d" / "f.txt").read_text() == "hi" and (back / "top").read_bytes() == b"\x00\x01"
    with pytest.raises(ConfigError, match="absolute path"):
        pack(src, "relative")


def _guest_tree_with_links(tmp_path: Path) -> str:
    tree = tmp_path / "etc"
    tree.mkdir()
    (tree / "hostname").write_text("n1\n")
    (tree / "localtime").symlink_to("/usr/share/zoneinfo/Etc/UTC")  # absolute, as in a guest
    return AgentHandler.do_files_get(None, {"path": str(tree)})["tar_b64"]


def test_unpack_keeps_the_guests_absolute_symlinks(tmp_path):
    back = unpack(_guest_tree_with_links(tmp_path), tmp_path / "back")
    assert (back / "hostname").read_text() == "n1\n"
    assert os.readlink(back / "localtime") == "/usr/share/zoneinfo/Etc/UTC"


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no system python3")
def test_unpack_runs_on_the_systems_own_python(tmp_path):
    """setup.sh builds .venv from the system python3; Debian 12's (3.11.2) has no
    extraction filters, and `node.get` must work there too."""
    b64 = _guest_tree_with_links(tmp_path)
    # The system python has none of vmlab's dependencies: vmlab.files is loaded alone.
    out = bare_python.run("/usr/bin/python3",
                          "from pathlib import Path; from vmlab.files import unpack\n"
                          "print(unpack(sys.stdin.read(), Path(sys.argv[1])))",
                          str(tmp_path / "back"), stdin=b64)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "back" / "hostname").read_text() == "n1\n"


def test_agent_files_put_rejects_escaping_members(tmp_path):
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(BadRequest, match="leaves"):
        AgentHandler.do_files_put(None, {"path": str(tmp_path / "in"),
                                         "tar_b64": base64.b64encode(buf.getvalue()).decode()})
    assert not (tmp_path / "escape").exists()
    with pytest.raises(BadRequest, match="absolute"):
        AgentHandler.do_files_get(None, {"path": "relative"})


# ---------------------------------------------------------------- vnet echo (lan_ping)

def _router():
    from vmlab.vnet.core import NetworkConfig, VNet
    from vmlab.vnet.nat import resolve_nat
    vnet = VNet()
    router = vnet.add_network(NetworkConfig("lan", IPv4Network("192.168.1.0/24"),
                                            IPv4Address("2.1.1.1"), resolve_nat("easy"), 1))
    port = vnet.add_port("n/eth0", "lan", mac(1), IPv4Address("192.168.1.101"))
    return vnet, router, port


def test_gateway_echo_request_and_reply_are_recorded():
    from vmlab.vnet.frames import (ETH_IPV4, ICMP_ECHO_REPLY, PROTO_ICMP, build_eth,
                                   build_icmp_echo, build_ipv4, mac_bytes, parse_eth,
                                   parse_icmp_echo, parse_ipv4)
    vnet, router, port = _router()
    out = router.echo_request(IPv4Address("192.168.1.101"), 0x766D, 7, now=10.0)
    assert [p.name for p, _f in out] == ["n/eth0"]
    ip = parse_ipv4(parse_eth(out[0][1]).payload)
    echo = parse_icmp_echo(ip)
    assert (ip.src, ip.dst) == (router.gateway, IPv4Address("192.168.1.101"))
    assert (echo.ident, echo.seq) == (0x766D, 7)
    reply = build_ipv4(IPv4Address("192.168.1.101"), router.gateway, PROTO_ICMP,
                       build_icmp_echo(ICMP_ECHO_REPLY, 0x766D, 7, echo.data))
    frame = build_eth(router.mac, mac_bytes(mac(1)), ETH_IPV4, reply)
    assert vnet.receive(port, frame, 10.25) == []
    src, rtt = router.echo_replies[(0x766D, 7)]
    assert src == IPv4Address("192.168.1.101") and rtt == pytest.approx(0.25)
    # a reply nobody asked for is dropped and not recorded
    stray = build_eth(router.mac, mac_bytes(mac(1)), ETH_IPV4,
                      build_ipv4(IPv4Address("192.168.1.101"), router.gateway, PROTO_ICMP,
                                 build_icmp_echo(ICMP_ECHO_REPLY, 1, 1, b"")))
    vnet.receive(port, stray, 11.0)
    assert (1, 1) not in router.echo_replies
    assert any("did not ask for" in r for r in router.drops)
    assert router.echo_request(IPv4Address("192.168.1.200"), 1, 2, 12.0) == []


def test_gateway_echo_tables_are_bounded():
    from vmlab.vnet.router import MAX_ECHOES
    _vnet, router, _port = _router()
    for seq in range(MAX_ECHOES + 50):
        router.echo_request(IPv4Address("192.168.1.101"), 1, seq, float(seq))
    assert len(router._echoes_sent) == MAX_ECHOES


def test_env_rejects_two_different_provisions_with_one_name():
    env = Env(name="t")
    lan = env.add_network(wan_ip="2.1.1.1")
    env.add_node(lan, image="debian", provision=Provision("p", commands=["true"]))
    env.add_node(lan, image="debian", provision=Provision("p", commands=["true"]))
    with pytest.raises(ConfigError, match="different Provision named 'p'"):
        env.add_node(lan, image="debian", provision=Provision("p", commands=["false"]))


# ---------------------------------------------------------------- bootable disks

def test_mbr_has_grubs_code_the_signature_and_one_bootable_linux_partition():
    import struct

    from vmlab.images import bootdisk
    code = bytes(range(256)) * 2
    sector = bootdisk.mbr(8 << 20, code, 0x12345678)
    assert len(sector) == 512 and sector[510:] == b"\x55\xaa"
    assert sector[:440] == code[:440]  # the rest of boot.img would overwrite the table
    assert struct.unpack_from("<I", sector, 440)[0] == 0x12345678
    status, ptype, start, count = struct.unpack_from("<B3xB3xII", sector, 446)
    assert (status, ptype, start, count) == (0x80, 0x83, 2048, (8 << 20) - 2048)
    assert sector[462:510] == bytes(48)  # entries 2-4 empty
    with pytest.raises(ImageBuildError, match="cannot hold"):
        bootdisk.mbr(1000, code, 1)


def test_grub_cfg_boots_the_one_entry_at_once():
    from vmlab.images import bootdisk
    cfg = bootdisk.grub_cfg("/boot/vmlinuz-6", "/boot/initrd.img-6", "root=LABEL=root ro", "D")
    assert "set timeout=0" in cfg
    assert "  linux /boot/vmlinuz-6 root=LABEL=root ro\n  initrd /boot/initrd.img-6\n" in cfg
    assert "initrd" not in bootdisk.grub_cfg("/k", None, "ro", "D")


def test_write_bios_disk_refuses_a_root_without_grub(tmp_path):
    from vmlab.images import bootdisk
    with pytest.raises(ImageBuildError, match="grub-pc-bin"):
        bootdisk.write_bios_disk(tmp_path, tmp_path / "d.raw", size_bytes=1 << 30, cfg="")


def test_local_cloud_qcow2_recipe_has_what_the_cloud_kind_needs():
    from vmlab.images import cloudbuild
    need = {"cloud-init", "openssh-server", "python3", "iproute2", "systemd-sysv", "udev",
            "grub-pc-bin", "linux-image-cloud-amd64"}
    assert need <= set(cloudbuild.PACKAGES)
    assert cloudbuild.recipe_digest() == cloudbuild.recipe_digest()
    img = cloudbuild.LocalCloudImage(Path("/x/disk.qcow2"), "ab" * 32)
    assert img.url == "file:///x/disk.qcow2"
    assert img.spec().name == "cloud+" + "ab" * 6


# ---------------------------------------------------------------- debootstrap's lifetime

def _fake_debootstrap(tmp_path: Path, monkeypatch, body: str) -> Path:
    """A stand-in `debootstrap` (the real one takes minutes and the Debian mirror) that
    speaks its progress format; its argv ends SUITE ROOTFS MIRROR."""
    tool = tmp_path / "bin" / "debootstrap"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\nfor a; do prev=$root; root=$mirror; mirror=$a; done\n" + body)
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("VMLAB_CACHE", str(tmp_path / "cache"))
    if os.geteuid() != 0:
        pytest.skip("debian.debootstrap refuses to run without root")
    return tmp_path / "rootfs"


def test_an_interrupted_debootstrap_is_stopped_with_its_children(tmp_path, monkeypatch):
    rootfs = _fake_debootstrap(tmp_path, monkeypatch, (
        f"sleep 60 & echo $! > {tmp_path}/child\n"
        "echo 'I: Retrieving Release'\nwait\n"))

    def report(message, *_):
        if "retrieving" in message.lower():
            raise KeyboardInterrupt  # Ctrl-C while the build runs
    with pytest.raises(KeyboardInterrupt):
        debian.debootstrap(rootfs, ["openssh-server"], report, "debian")
    child = int((tmp_path / "child").read_text())
    deadline = time.monotonic() + 5
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child), "debootstrap's child outlived the interrupted build"


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for a reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_failed_debootstrap_shows_its_log_not_a_path_about_to_be_removed(tmp_path, monkeypatch):
    rootfs = _fake_debootstrap(tmp_path, monkeypatch, (
        'mkdir -p "$root/debootstrap"\n'
        'echo "E: Couldn\'t download packages: openssh-server" > "$root/debootstrap/debootstrap.log"\n'
        "echo 'E: see the log'\nexit 1\n"))
    with pytest.raises(ImageBuildError, match="(?s)exit 1.*debootstrap.log.*Couldn't download"):
        debian.debootstrap(rootfs, ["openssh-server"], lambda *a: None, "debian")


def test_lan_ping_from_vnet_on_an_ipv6_only_lan_names_the_fix():
    env = Env(name="t")
    lan = env.add_network(ipv4=False, ipv6="fd00:1::/64")
    node = env.add_node(lan, no_agent=True)
    assert node.lan_ip().version == 6
    with pytest.raises(ConfigError, match="IPv6-only.*source="):
        env.lan_ping(node)


def test_the_demo_records_a_node_that_never_answers_lan_ping_as_a_failed_check():
    """It raised out of the demo, which then printed no table at all. `env` stands in for a
    started Env whose lan_ping ran out of time (no VM here)."""
    from types import SimpleNamespace
    from vmlab.demo import _lan_ping
    from vmlab.errors import VmlabTimeout

    def lan_ping(target, **kw):
        raise VmlabTimeout("lan_ping: dave (192.168.1.104) did not answer vnet within 60 s")
    dave = SimpleNamespace(lan_ip=lambda: IPv4Address("192.168.1.104"))
    r = _lan_ping(SimpleNamespace(lan_ping=lan_ping), dave, timeout_s=60)
    assert not r.ok and "did not answer" in r.output and r.address == "192.168.1.104"
