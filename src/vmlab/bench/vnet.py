"""`vmlab bench vnet`: vnet's forwarding rate on synthetic frames, and guest TCP across NATs.

Part 1 (no VM): builds a VNet with an easy-NAT network (two nodes) and a one2one network
(one node), then pushes pre-built UDP frames through it on this thread, one core:
  lan   node -> node on the same LAN (switch only)
  nat   node -> public node across two NATs (switch, router, easy NAT, internet, router,
        one2one NAT, switch), and the reply back; the budget's "100k frames/s" is for this
Each frame is a full `VNet.receive` with a fresh `now`; the frames are built once.

Part 2 (two VMs, unless --no-vm): alice (behind the easy NAT) sends N MB over TCP to bob's
WAN address (one2one), with the guests' python3. It reports the goodput and where the CPU
time went: this process (vnet, driver, everything on the Env's loop) and each QEMU, as a
share of one core over the transfer. vnet is not the bottleneck when its share stays well
below 100% while a QEMU's is near 100% (TCG runs each guest's vCPU on one host thread).

The last line is machine-readable: `frames_per_s=<nat rate> guest_tcp_mbit=<rate>`.
"""
from __future__ import annotations

import os
import time
from ipaddress import IPv4Address, IPv4Network

from ..vnet import frames as F
from ..vnet.core import NetworkConfig, VNet, node_mac, router_mac
from ..vnet.nat import NatType

__all__ = ["bench_frames", "bench_guest_tcp", "main"]


def _udp(src_mac, dst_mac, src, dst, sport, dport, payload):
    src, dst = IPv4Address(src), IPv4Address(dst)
    packet = F.build_ipv4(src, dst, F.PROTO_UDP, F.build_udp(src, dst, sport, dport, payload))
    return F.build_eth(F.mac_bytes(dst_mac), F.mac_bytes(src_mac), F.ETH_IPV4, packet)


def bench_frames(n: int = 200_000, payload: int = 64) -> dict[str, float]:
    """Frames per second through vnet for each path (see the module docstring)."""
    vnet = VNet(seed=1)
    vnet.add_network(NetworkConfig("home", IPv4Network("192.168.1.0/24"), IPv4Address("2.1.1.1"),
                                   NatType.EASY, 1))
    vnet.add_network(NetworkConfig("dc", IPv4Network("10.0.5.0/24"), IPv4Address("5.6.7.8"),
                                   NatType.ONE2ONE, 2))
    a = vnet.add_port("a/eth0", "home", node_mac(1), IPv4Address("192.168.1.101"))
    b = vnet.add_port("b/eth0", "home", node_mac(2), IPv4Address("192.168.1.102"))
    c = vnet.add_port("c/eth0", "dc", node_mac(3), IPv4Address("10.0.5.103"))
    body = b"x" * payload
    lan = _udp(node_mac(1), node_mac(2), "192.168.1.101", "192.168.1.102", 1000, 2000, body)
    out = _udp(node_mac(1), router_mac(1), "192.168.1.101", "5.6.7.8", 1000, 2000, body)
    first = vnet.receive(a, out, 0.0)
    if len(first) != 1:
        raise RuntimeError(f"benchmark topology broken: {vnet.drops()}")
    wan_port = F.parse_udp(F.parse_ipv4(F.parse_eth(first[0][1]).payload)).sport
    back = _udp(node_mac(3), router_mac(2), "10.0.5.103", "2.1.1.1", 2000, wan_port, body)
    # ARP-free: vnet knows every node's MAC from add_port
    results = {}
    for name, frames in (("lan", [(a, lan)]), ("nat", [(a, out), (c, back)])):
        t0 = time.perf_counter()
        now = 1.0
        receive = vnet.receive
        for i in range(n // len(frames)):
            now += 1e-6
            for port, frame in frames:
                if len(receive(port, frame, now)) != 1:
                    raise RuntimeError(f"{name}: frame dropped: {vnet.drops()}")
        elapsed = time.perf_counter() - t0
        results[name] = (n // len(frames)) * len(frames) / elapsed
    del b
    return results


def _cpu_s(pid: int | None = None) -> float:
    """User+system CPU seconds of a process (this one if None)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_RECEIVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001)); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); n = 0
while True:
    d = c.recv(262144)
    if not d: break
    n += len(d)
open("/tmp/received", "w").write(str(n))
"""

_SENDER = """
import socket, sys, time
n = int(sys.argv[2]); buf = b"x" * 65536
s = socket.create_connection((sys.argv[1], 5001), timeout=30)
t = time.monotonic(); sent = 0
while sent < n:
    sent += s.send(buf[:min(len(buf), n - sent)])
s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
print(f"{sent} {time.monotonic() - t:.3f}")
"""


def bench_guest_tcp(megabytes: int = 16, say=print) -> dict[str, float]:
    """Bulk TCP from alice (easy NAT) to bob (one2one) across two NATs, in real guests."""
    from ..env import Env
    with Env(name="bench-vnet") as env:
        home = env.add_network(name="home", wan_ip="2.1.1.1", lan="192.168.1.0/24", nat="easy")
        dc = env.add_network(name="dc", wan_ip="5.6.7.8", lan="10.0.5.0/24", nat="one2one")
        alice = env.add_node(home, name="alice")
        bob = env.add_node(dc, name="bob")
        env.start()
        bob.exec(["sh", "-c", "cat > /tmp/recv.py"], stdin=_RECEIVER.encode(), check=True)
        alice.exec(["sh", "-c", "cat > /tmp/send.py"], stdin=_SENDER.encode(), check=True)
        bob.exec("python3 /tmp/recv.py > /tmp/recv.log 2>&1 &", check=True)
        for _ in range(100):
            if "ready" in bob.exec("cat /tmp/recv.log").stdout:
                break
            time.sleep(0.1)
        pids = {n.name: n.vm.pid for n in (alice, bob)}
        cpu0 = {name: _cpu_s(pid) for name, pid in pids.items()}
        self0 = _cpu_s()
        t0 = time.monotonic()
        r = alice.exec(["python3", "/tmp/send.py", str(bob.wan_ip()), str(megabytes << 20)],
                       timeout_s=600, check=True)
        wall = time.monotonic() - t0
        cpu = {name: (_cpu_s(pid) - cpu0[name]) / wall for name, pid in pids.items()}
        vnet_share = (_cpu_s() - self0) / wall
        sent, guest_s = r.stdout.split()
        received = int(bob.exec("cat /tmp/received").stdout or 0)
        if received != int(sent):
            raise RuntimeError(f"bob received {received} of {sent} bytes")
        mbit = int(sent) * 8 / float(guest_s) / 1e6
        say(f"guest TCP: {int(sent) >> 20} MiB alice -> bob ({bob.wan_ip()}, two NATs) in "
            f"{float(guest_s):.2f} s: {mbit:.1f} Mbit/s")
        # The CPU window is the whole exec (guest python start-up included), the rate's
        # window only the transfer: the shares below are per window second, and the same
        # CPU seconds over the transfer alone bound the share from above.
        busy = float(guest_s)
        say(f"CPU share of one core over the exec ({wall:.2f} s) / over the transfer alone "
            f"({busy:.2f} s, an upper bound): vnet process {vnet_share:.0%} / "
            f"{vnet_share * wall / busy:.0%}, " +
            ", ".join(f"QEMU {name} {share:.0%} / {share * wall / busy:.0%}"
                      for name, share in cpu.items()))
        drops = {k: v for k, v in env.vnet_drops().items()}
        if drops:
            say(f"vnet drops during the run: {drops}")
        return {"guest_tcp_mbit": mbit, "vnet_cpu": vnet_share, **{f"qemu_{k}_cpu": v
                                                                    for k, v in cpu.items()}}


def main(*, frames: int = 200_000, vm: bool = True, megabytes: int = 16, profile: bool = False,
         say=print) -> int:
    say(f"vnet synthetic forwarding, {frames} frames per path, one core (this thread):")
    if profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
    rates = bench_frames(frames)
    if profile:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    say(f"  lan (switch only):                     {rates['lan']:>10,.0f} frames/s")
    say(f"  nat (switch+router+NAT+internet, x2):  {rates['nat']:>10,.0f} frames/s")
    mbit = float("nan")
    if vm:
        mbit = bench_guest_tcp(megabytes, say)["guest_tcp_mbit"]
    say(f"frames_per_s={rates['nat']:.0f} guest_tcp_mbit={mbit:.1f}")
    return 0
