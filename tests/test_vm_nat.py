"""VM tests: NAT presets classified by a STUN client vmlab did not write, and port mapping
from a guest with a NAT-PMP client and a UPnP client vmlab did not write.

The clients are Debian's: `stun` (package stun-client: RFC 3489 classic tests plus mapping,
hairpin and port-preservation tests) , `natpmpc` (natpmpc) and `upnpc` (miniupnpc). They are
copied from the host into the guest with the shared libraries `ldd` lists and run through
the copied dynamic loader, so the guest image needs none of them. scripts/setup.sh installs
them on the host.

One Env holds one network per preset with one node each (a restored node costs little, a
boot per test would cost much), plus a public node that plays the outside peer.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from vmlab import Env
from vmlab.vnet.stun import STUN_PRIMARY_IPV4

pytestmark = pytest.mark.vm

#: preset -> what the stun client prints for it. Its words: "Port Dependent Filter" is
#: address-and-port-dependent filtering; it tells mappings apart only as independent or not.
#: Its hairpin test sends from the socket it tested with to that socket's own mapped address,
#: which an address-and-port-dependent mapping gives a new port that the first mapping's
#: filter then drops: symmetric does hairpin (see test_vnet_nat.py), but this client cannot
#: see it. one2one is NAT too (the guest's address is private), a full cone one; only the
#: routed network ("none") is "Open".
_APDF = "Independent Mapping, Port Dependent Filter, preserves ports, will hairpin"
_ADF = "Independent Mapping, Address Dependent Filter, preserves ports, will hairpin"
EXPECTED = {
    "easy": _APDF,
    "port_restricted_cone": _APDF,
    "easyaf": _ADF,
    "restricted_cone": _ADF,
    "full_cone": "Independent Mapping, Independent Filter, preserves ports, will hairpin",
    "hard": "Dependent Mapping, random port, no hairpin",
    "symmetric": "Dependent Mapping, random port, no hairpin",
    "one2one": "Independent Mapping, Independent Filter, preserves ports, will hairpin",
    "none": "Open",
}
LANS = {kind: f"192.168.{i + 10}.0/24" for i, kind in enumerate(EXPECTED)}
LANS["none"] = "44.0.9.0/24"  # routed: a public prefix
TOOLS = {"stun": "/usr/bin/stun", "natpmpc": "/usr/bin/natpmpc", "upnpc": "/usr/bin/upnpc"}


def _tool_files(binary: str) -> list[Path]:
    """The binary, every library ldd resolves for it, and the dynamic loader."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    files = [Path(binary)]
    for line in out.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            files.append(Path(m.group(1)))
    return files


def push_tool(node, name: str) -> str:
    """Copy host tool `name` into the guest; returns a shell prefix that runs it."""
    binary = shutil.which(name) or TOOLS[name]
    d = f"/opt/{name}"
    node.exec(["mkdir", "-p", d], check=True)
    loader = None
    for f in _tool_files(binary):
        node.exec(["sh", "-c", f"cat > {d}/{f.name} && chmod 755 {d}/{f.name}"],
                  stdin=f.resolve().read_bytes(), check=True)
        if f.name.startswith("ld-linux"):
            loader = f.name
    return f"{d}/{loader} --library-path {d} {d}/{Path(binary).name}"


@pytest.fixture(scope="module")
def world():
    missing = [t for t, p in TOOLS.items() if shutil.which(t) is None and not Path(p).exists()]
    if missing:
        pytest.skip(f"host lacks {', '.join(missing)}: run scripts/setup.sh (apt-get install "
                    f"stun-client natpmpc miniupnpc)")
    env = Env(name="test_vm_nat")
    nodes = {}
    nets = {}
    for i, kind in enumerate(EXPECTED):
        pm = ["natpmp", "upnp"] if kind == "easy" else None
        nets[kind] = env.add_network(name=kind, wan_ip=f"2.1.1.{i + 1}", lan=LANS[kind], nat=kind,
                                     port_mapping=pm)
        nodes[kind] = env.add_node(nets[kind], name=kind.replace("_", "-"))
    outside = env.add_network(name="outside", wan_ip="5.6.7.8", lan="10.0.5.0/24", nat="one2one")
    nodes["outside"] = env.add_node(outside, name="outside")
    try:
        env.start()
        yield env, nets, nodes
    except BaseException:
        env.keep_work_dir = True
        raise
    finally:
        env.close()


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_stun_client_classifies_preset(world, kind):
    _env, _nets, nodes = world
    node = nodes[kind]
    stun = push_tool(node, "stun")
    # A source port inside the presets' public range (32768-65535), where they preserve ports.
    r = node.exec(f"{stun} {STUN_PRIMARY_IPV4} -p 40000", timeout_s=60)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("Primary:")), r.stdout)
    assert line.split(":", 1)[-1].strip() == EXPECTED[kind], r.stdout + r.stderr


def _serve_http(node, port: int) -> None:
    node.exec(f"mkdir -p /srv && echo hello-{node.name} > /srv/index.html && cd /srv && "
              f"(python3 -m http.server {port} >/tmp/http{port}.log 2>&1 &)", check=True)


def _get_from_outside(outside, url: str):
    deadline = time.monotonic() + 30
    while True:
        try:
            return outside.http_get(url, timeout_s=5)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_natpmpc_maps_a_port_the_outside_can_reach(world):
    env, nets, nodes = world
    node, outside, net = nodes["easy"], nodes["outside"], nets["easy"]
    natpmpc = push_tool(node, "natpmpc")
    r = node.exec(f"{natpmpc} -g {net.gateway} -a 8080 8080 tcp 600", timeout_s=30)
    assert "Mapped public port 8080 protocol TCP to local port 8080" in r.stdout, \
        r.stdout + r.stderr
    assert f"Public IP address : {net.wan_ip}" in r.stdout
    _serve_http(node, 8080)
    resp = _get_from_outside(outside, f"http://{net.wan_ip}:8080/")
    assert resp.status == 200 and resp.body.strip() == b"hello-easy"
    # without a mapping, the same request is filtered by the NAT
    with pytest.raises(Exception):
        outside.http_get(f"http://{net.wan_ip}:8090/", timeout_s=3)


def test_upnpc_maps_a_port_the_outside_can_reach(world):
    env, nets, nodes = world
    node, outside, net = nodes["easy"], nodes["outside"], nets["easy"]
    upnpc = push_tool(node, "upnpc")
    r = node.exec(f"{upnpc} -e vmlab -a {node.lan_ip()} 8081 18081 TCP", timeout_s=60)
    assert "is redirected to internal" in r.stdout, r.stdout + r.stderr
    assert f"ExternalIPAddress = {net.wan_ip}" in r.stdout
    _serve_http(node, 8081)
    resp = _get_from_outside(outside, f"http://{net.wan_ip}:18081/")
    assert resp.status == 200 and resp.body.strip() == b"hello-easy"
