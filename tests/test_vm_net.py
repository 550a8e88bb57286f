"""VM tests of vnet's network features (run with --run-vm-tests): IPv6-only connectivity
across networks, DNS and an HTTP service on the simulated internet resolved and fetched from
a guest, link cuts, a pcap that tshark reads, and the datagram NIC transport.

One Env serves the module: alice on a dual-stack NAT'd network, bob on an IPv6-only one.
"""
from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from vmlab import Env

pytestmark = pytest.mark.vm

SEEN = []


@pytest.fixture(scope="module")
def world():
    env = Env(name="test_vm_net", pcap=True)
    home = env.add_network(name="home", wan_ip="2.1.1.1", lan="192.168.1.0/24", nat="easy",
                           ipv6="2001:db8:1::/64")
    v6net = env.add_network(name="v6only", ipv4=False, ipv6="2001:db8:2::/64")
    alice = env.add_node(home, name="alice")
    bob = env.add_node(v6net, name="bob")
    env.dns_register("web.test", "8.8.4.4", "2001:db8:99::80")

    def hello(req):
        SEEN.append(req.remote)
        return f"hello {req.path}\n"
    env.serve_http("8.8.4.4", 80, {"/": hello})
    env.serve_http("2001:db8:99::80", 80, {"/": hello})
    try:
        env.start()
        yield env, home, v6net, alice, bob
    except BaseException:
        env.keep_work_dir = True
        raise
    finally:
        env.close()


def _retry(fn, budget_s=30.0):
    deadline = time.monotonic() + budget_s
    while True:
        r = fn()
        if r or time.monotonic() > deadline:
            return r
        time.sleep(0.5)


def test_ipv6_only_node_gets_slaac_address_and_reaches_other_network(world):
    _env, _home, _v6, alice, bob = world
    # bob's agent reached the driver over IPv6 (its network has no IPv4 at all)
    addrs = bob.exec("ip -6 addr show dev eth0", check=True).stdout
    assert str(bob.ipv6()) in addrs, addrs
    assert "inet " not in bob.exec("ip -4 addr show dev eth0").stdout
    assert str(alice.ipv6()) in alice.exec("ip -6 addr show dev eth0", check=True).stdout
    r = _retry(lambda: bob.ping(alice.ipv6(), count=2, timeout_s=5).ok)
    assert r
    assert alice.ping(bob.ipv6(), count=2).received == 2


def test_guest_resolves_registered_name_and_fetches_service(world):
    _env, _home, _v6, alice, bob = world
    out = alice.exec("nslookup web.test", check=True).stdout
    assert "8.8.4.4" in out, out
    assert "52.52.0.53" in alice.exec("cat /etc/resolv.conf").stdout
    r = alice.exec("nslookup nosuch.test")
    assert r.exit_code != 0 or "NXDOMAIN" in r.stdout + r.stderr or "can't" in r.stdout + r.stderr
    # libc's resolver (python's getaddrinfo) works in the appliance too
    r = alice.exec(["python3", "-c", "import socket; print(sorted({a[4][0] for a in "
                    "socket.getaddrinfo('web.test', 80)}))"], check=True)
    assert "8.8.4.4" in r.stdout, r
    resp = alice.http_get("http://web.test/", timeout_s=20)
    assert resp.status == 200 and resp.body == b"hello /\n"
    # dual-stack alice prefers the AAAA record: IPv6 is routed, not NATed
    assert str(SEEN[-1][0]) == str(alice.ipv6())
    resp = alice.http_get("http://8.8.4.4/", timeout_s=20)
    assert resp.body == b"hello /\n" and str(SEEN[-1][0]) == "2.1.1.1"  # IPv4: after NAT
    # the IPv6-only node reaches the service over IPv6
    resp = bob.http_get("http://[2001:db8:99::80]/", timeout_s=20)
    assert resp.status == 200 and str(SEEN[-1][0]) == str(bob.ipv6())


def test_cut_link_and_restore(world):
    _env, _home, _v6, alice, bob = world
    alice.set_link(False)
    try:
        assert bob.ping(alice.ipv6(), count=2, timeout_s=2).received == 0
    finally:
        alice.set_link(True)
    assert _retry(lambda: bob.ping(alice.ipv6(), count=1, timeout_s=3).ok)
    assert alice.exec("echo back").stdout == "back\n"  # the agent's connections recovered


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed (setup.sh)")
def test_pcap_is_read_by_tshark(world):
    env, _home, _v6, alice, bob = world
    bob.ping(alice.ipv6(), count=1)
    path = env.flush_pcap()
    r = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.interface_name",
                        "-Y", "icmpv6.type == 128"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    interfaces = set(r.stdout.split())
    assert {"bob/eth0", "v6only-lan", "v6only-wan", "home-wan", "alice/eth0"} <= interfaces
    r = subprocess.run(["tshark", "-r", str(path), "-Y", "dns.qry.name == web.test", "-T",
                        "fields", "-e", "frame.interface_name"], capture_output=True, text=True,
                       timeout=120)
    assert "home-wan" in r.stdout.split()


def test_datagram_nic_transport(tmp_path):
    env = Env(name="test_dgram", nic_transport="dgram", keep_work_dir=True)
    net = env.add_network(wan_ip="3.3.3.3", lan="192.168.7.0/24")
    node = env.add_node(net, name="dgram")
    try:
        env.start()
        assert node.exec("echo ok").stdout == "ok\n"
        assert node.ping(net.gateway, count=2).received == 2
    finally:
        env.close()
    leftovers = [p.name for p in env.work_dir.rglob("*") if p.is_socket()]
    shutil.rmtree(env.work_dir, ignore_errors=True)
    assert not [n for n in leftovers if n.startswith("nic")], leftovers
