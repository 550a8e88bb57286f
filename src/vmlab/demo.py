"""`vmlab demo`: three real VMs on a simulated internet, and checks of what the NAT allows.

Two nodes (alice, bob) share a LAN behind an easy NAT; a third (carol) sits on another
network with a public one-to-one address. The demo shows the LAN nodes ping each other,
both reach carol through the NAT (and carol sees them as the NAT's WAN IP), and carol
cannot reach them unsolicited. It prints a table and returns non-zero if a check failed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from .env import Env

__all__ = ["run_demo"]


@dataclass
class Check:
    node: str
    what: str
    ok: bool
    detail: str


def run_demo(*, image: str = "appliance", console: Console | None = None) -> int:
    console = console or Console(stderr=True)
    out = Console()
    t0 = time.monotonic()
    checks: list[Check] = []

    def say(msg: str) -> None:
        console.print(f"[dim]{time.monotonic() - t0:6.1f}s[/dim] {msg}")

    def check(node: str, what: str, ok: bool, detail: str = "") -> None:
        checks.append(Check(node, what, ok, detail))
        say(f"{'[green]ok[/green]' if ok else '[red]FAILED[/red]'}  {node}: {what} {detail}")

    with Env(name="demo", progress=say) as env:
        home = env.add_network(name="home", wan_ip="2.1.1.1", lan="192.168.1.0/24", nat="easy")
        dc = env.add_network(name="dc", wan_ip="5.6.7.8", lan="10.0.5.0/24", nat="one2one")
        alice = env.add_node(home, name="alice", image=image)
        bob = env.add_node(home, name="bob", image=image)
        carol = env.add_node(dc, name="carol", image=image)
        say("starting: 3 nodes, networks home (easy NAT, 2.1.1.1) and dc (one2one, 5.6.7.8)")
        env.start()

        say("LAN: alice <-> bob")
        for a, b in ((alice, bob), (bob, alice)):
            r = a.ping(b.lan_ip(), count=3)
            check(a.name, f"ping {b.name} on the LAN ({b.lan_ip()})", r.ok,
                  f"{r.received}/{r.transmitted} replies")

        say("through the NAT: alice, bob -> carol's public address")
        for a in (alice, bob):
            r = a.ping(carol.wan_ip(), count=3)
            check(a.name, f"ping carol at {carol.wan_ip()} through the NAT", r.ok,
                  f"{r.received}/{r.transmitted} replies")

        carol.exec("python3 -m http.server 8080 >/tmp/http.log 2>&1 &", check=True)
        seen = None
        for _ in range(20):  # the server needs a moment to bind under TCG
            try:
                resp = alice.http_get(f"http://{carol.wan_ip()}:8080/", timeout_s=5)
                seen = resp.status
                break
            except Exception:
                time.sleep(0.5)
        log = carol.exec("cat /tmp/http.log").stdout
        check("alice", "fetch http://5.6.7.8:8080/ from carol over TCP", seen == 200,
              f"HTTP {seen}")
        check("carol", "sees alice's request coming from the NAT's WAN IP 2.1.1.1",
              "2.1.1.1" in log, log.strip().splitlines()[-1] if log.strip() else "(no request)")

        say("unsolicited: carol -> home")
        r = carol.ping(home.wan_ip, count=2, timeout_s=3)
        check("carol", f"ping home's WAN IP {home.wan_ip} is dropped", r.received == 0,
              f"{r.received}/{r.transmitted} replies")
        r = carol.ping(alice.lan_ip(), count=2, timeout_s=3)
        check("carol", f"ping alice's private address {alice.lan_ip()} is dropped",
              r.received == 0, f"{r.received}/{r.transmitted} replies")
        r = carol.exec(["python3", "-c",
                        "import socket; s=socket.socket(); s.settimeout(3); "
                        f"s.connect(('{home.wan_ip}', 8080))"], timeout_s=10)
        check("carol", f"TCP connect to {home.wan_ip}:8080 fails", r.exit_code != 0,
              (r.stderr.strip().splitlines() or ["exit 0"])[-1])

        table = Table(title=f"vmlab demo ({env.accel.name if hasattr(env.accel, 'name') else env.accel})")
        for col in ("node", "LAN IP", "WAN IP", "boot→agent s", "checks"):
            table.add_column(col)
        for node in env.nodes:
            mine = [c for c in checks if c.node == node.name]
            passed = sum(c.ok for c in mine)
            table.add_row(node.name, str(node.lan_ip()), str(node.wan_ip()),
                          f"{node.boot_to_agent_s:.1f}",
                          f"[{'green' if passed == len(mine) else 'red'}]{passed}/{len(mine)} passed")
        out.print(table)
    failed = [c for c in checks if not c.ok]
    wall = time.monotonic() - t0
    out.print(f"{len(checks) - len(failed)} passed, {len(failed)} failed in {wall:.1f} s")
    for c in failed:
        out.print(f"[red]FAILED[/red] {c.node}: {c.what} ({c.detail})")
    return 1 if failed else 0
