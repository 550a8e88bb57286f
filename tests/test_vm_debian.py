"""VM tests for the second OS kind: a systemd Debian next to the appliance (--run-vm-tests).

One Env for the whole module (a debian snapshot costs a couple of minutes to prepare from an
empty cache under TCG): on one LAN, an appliance node, a debian node provisioned at
snapshot-preparation time, and a debian node with no agent. Every node is restored from a
snapshot. Like the reference's TestMacOSAndLinuxCanPing, the two OSes ping each other, and
the agent-less node is reached with lan_ping, from vnet itself and from another node.
"""
from __future__ import annotations

import pytest

from vmlab import Env, ImageSpec, Provision, StateError
from vmlab.snapshot.cache import list_entries

pytestmark = pytest.mark.vm

# network=True: the step fetches from the Debian mirror (which setup.sh needs anyway) through
# QEMU's NAT on the prep NIC, as a user's `apt-get install` would.
PROVISION = Provision(
    "marker",
    files={"/etc/vmlab-provisioned": "written by the provisioning step\n"},
    commands=["echo ran-at-prepare > /var/lib/vmlab-provision-ran",
              "test -s /etc/vmlab-provisioned",
              "python3 -c \"import urllib.request as u; open('/var/lib/vmlab-fetched', 'wb')"
              ".write(u.urlopen('http://deb.debian.org/debian/dists/bookworm/InRelease',"
              " timeout=60).read(4096))\""],
    network=True)


@pytest.fixture(scope="module")
def world():
    env = Env(name="test_vm_debian")
    lan = env.add_network(name="lan", wan_ip="2.1.1.1", lan="192.168.1.0/24", nat="easy")
    gk = env.add_node(lan, name="gk")
    deb = env.add_node(lan, name="deb", image=ImageSpec("debian"), provision=PROVISION)
    quiet = env.add_node(lan, name="quiet", image="debian", provision=PROVISION, no_agent=True)
    try:
        env.start()
        yield env, gk, deb, quiet
    except BaseException:
        env.keep_work_dir = True
        raise
    finally:
        env.close()


def test_every_node_was_restored(world):
    _env, gk, deb, quiet = world
    assert [n.boot_mode for n in (gk, deb, quiet)] == ["restore"] * 3, \
        [(n.name, n.fallback_reason) for n in (gk, deb, quiet)]


def test_debian_and_appliance_ping_each_other(world):
    _env, gk, deb, _quiet = world
    assert deb.ping(gk.lan_ip(), count=2).received > 0
    assert gk.ping(deb.lan_ip(), count=2).received > 0


def test_os_is_in_each_status(world):
    env, gk, deb, quiet = world
    assert deb.status()["os"].startswith("Debian 12 with systemd")
    assert "appliance" in gk.status()["os"]
    assert quiet.os.startswith("Debian 12 with systemd")
    board = env.dashboard.board.nodes
    assert board["deb"].os == deb.os and board["gk"].os == gk.os


def test_agent_runs_as_a_systemd_unit(world):
    _env, _gk, deb, _quiet = world
    r = deb.exec("systemctl is-active vmlab-agent.service; systemctl is-enabled "
                 "vmlab-agent.service; systemctl show -p Restart --value vmlab-agent.service")
    assert r.stdout.split() == ["active", "enabled", "always"], r.stdout + r.stderr


def test_prep_nic_is_left_down_without_an_address(world):
    _env, _gk, deb, _quiet = world
    nics = {i["mac"]: i for i in deb.status()["interfaces"]}
    prep = nics["52:cc:cc:cc:fe:00"]
    assert prep["ipv4"] == [] and not prep["up"]
    assert deb.exec("ip route show default").stdout.split()[:3] == ["default", "via", "192.168.1.1"]


def test_no_agent_node_answers_lan_ping_from_vnet_and_from_a_node(world):
    env, gk, _deb, quiet = world
    from_vnet = env.lan_ping(quiet, timeout_s=60)
    assert from_vnet.received == 1 and from_vnet.rtts_ms
    assert env.lan_ping("quiet", source=gk, timeout_s=60).ok
    with pytest.raises(StateError, match="no_agent"):
        quiet.exec("true")


def test_lan_ping_from_vnet_reaches_agent_nodes_too(world):
    env, gk, deb, _quiet = world
    assert env.lan_ping(gk).ok and env.lan_ping(deb).ok


def test_provisioning_ran_once_at_prepare_time_and_is_cached(world):
    _env, _gk, deb, _quiet = world
    assert deb.exec("cat /etc/vmlab-provisioned").stdout == "written by the provisioning step\n"
    assert deb.exec("cat /var/lib/vmlab-provision-ran").stdout.strip() == "ran-at-prepare"
    assert "Origin: Debian" in deb.exec("cat /var/lib/vmlab-fetched").stdout
    # The step's route and resolver through QEMU's NAT did not reach the snapshot.
    assert "10.0.2.2" not in deb.exec("ip route").stdout
    assert "10.0.2.3" not in deb.exec("cat /etc/resolv.conf").stdout
    metas = [meta for _entry, meta, problem in list_entries()
             if meta.get("provision") and problem is None]
    assert any(m["provision"]["digest"] == PROVISION.digest and m["disk"] for m in metas)


@pytest.mark.parametrize("node_name", ["deb", "gk"])
def test_put_and_get_files_and_folders(world, tmp_path, node_name):
    env = world[0]
    node = env.node(node_name)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)) * 40)
    node.put(src, "/tmp/pushed")
    node.put(src / "a.txt", "/tmp/single.txt")
    node.put(src / "a.txt", "/tmp/pushed/sub/")  # into the folder, keeping its name
    assert node.exec("cat /tmp/pushed/a.txt /tmp/single.txt /tmp/pushed/sub/a.txt").stdout \
        == "alpha\nalpha\nalpha\n"
    # A guest's /etc holds symlinks, some absolute: the fetch keeps them as links.
    links = set(node.exec("cd /etc && find . -maxdepth 1 -type l | sort", check=True)
                .stdout.split())
    etc = node.get("/etc", tmp_path / "etc")
    assert {f"./{p.name}" for p in etc.iterdir() if p.is_symlink()} == links
    assert links or node_name == "gk"  # the appliance's initramfs /etc has none
    node.exec("mkdir -p /tmp/made/deep && echo guest > /tmp/made/deep/g.txt", check=True)
    got = node.get("/tmp/made", tmp_path / "back")
    assert (got / "deep" / "g.txt").read_text() == "guest\n"
    assert node.get("/tmp/pushed/sub/b.bin", tmp_path / "b.bin").read_bytes() == \
        (src / "sub" / "b.bin").read_bytes()


def test_a_killed_agent_is_restarted_by_systemd_and_reconnects(world):
    """Last in the module: it kills deb's agent. systemd restarts it (Restart=always), the
    new process dials in with a new instance, and the driver serves requests on it."""
    import time

    from vmlab.errors import VmlabError
    env, _gk, deb, _quiet = world
    before = env._driver.hello(deb.macs[0]).instance
    pid = deb.exec("systemctl show -p MainPID --value vmlab-agent.service", check=True).stdout.strip()
    # Killed from a detached shell, after this request has been answered.
    deb.exec(f"setsid -f sh -c 'sleep 0.5; kill -9 {pid}' </dev/null >/dev/null 2>&1", check=True)
    deadline = time.monotonic() + 60
    while True:
        time.sleep(0.5)
        try:
            now = deb.exec("systemctl show -p MainPID --value vmlab-agent.service; "
                           "systemctl show -p NRestarts --value vmlab-agent.service",
                           check=True, timeout_s=10).stdout.split()
            if now and now[0] != pid:
                break
        except VmlabError:
            pass  # a request on a connection of the dead process, or none open yet
        assert time.monotonic() < deadline, "the agent did not come back within 60 s"
    assert int(now[1]) >= 1
    assert env._driver.hello(deb.macs[0]).instance != before
    assert deb.exec("hostname", check=True).stdout.strip() == "deb"
