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
from .errors import VmlabTimeout
from .node import PingResult

__all__ = ["run_demo"]


@dataclass
class Check:
    node: str
    what: str
    ok: bool
    detail: str


#: The demo's own steps on the dashboard, declared before start so the list is whole.
PHASES = ("LAN: alice <-> bob", "through the NAT: alice, bob -> carol's public address",
          "unsolicited: carol -> home")
NO_AGENT_PHASE = "no agent: lan_ping dave"


def _lan_ping(env: Env, target, **kw) -> PingResult:
    """env.lan_ping, with a node that never answered as a failed check, not a crash."""
    try:
        return env.lan_ping(target, **kw)
    except VmlabTimeout as err:
        return PingResult(str(target.lan_ip()), 0, 0, 1.0, (), str(err))


def run_demo(*, image: str = "appliance", images: list[str] | None = None,
             console: Console | None = None, web: str | None = None,
             web_keep: bool = False) -> int:
    """Run the demo; `web` ("HOST:PORT", "" for the default) also serves its dashboard.

    `images`: alice, bob and carol take these in turn (["appliance", "debian"]: alice and
    carol run the appliance, bob Debian with systemd); with "debian" among them a fourth
    node, dave, runs Debian with no agent and is reached with lan_ping."""
    images = images or [image]
    console = console or Console(stderr=True)
    out = Console()
    t0 = time.monotonic()
    checks: list[Check] = []

    def say(msg: str) -> None:
        console.print(f"[dim]{time.monotonic() - t0:6.1f}s[/dim] {msg}")

    def check(node: str, what: str, ok: bool, detail: str = "") -> None:
        checks.append(Check(node, what, ok, detail))
        say(f"{'[green]ok[/green]' if ok else '[red]FAILED[/red]'}  {node}: {what} {detail}")

    running: list = []

    def phase(name: str) -> None:
        say(name)
        if running:
            running.pop().end()
        running.append(env.step(name).begin())

    with Env(name="demo", progress=say, web=web, web_keep=web_keep) as env:
        home = env.add_network(name="home", wan_ip="2.1.1.1", lan="192.168.1.0/24", nat="easy")
        dc = env.add_network(name="dc", wan_ip="5.6.7.8", lan="10.0.5.0/24", nat="one2one")
        alice = env.add_node(home, name="alice", image=images[0])
        bob = env.add_node(home, name="bob", image=images[1 % len(images)])
        carol = env.add_node(dc, name="carol", image=images[2 % len(images)])
        dave = (env.add_node(home, name="dave", image="debian", no_agent=True)
                if "debian" in images else None)
        for name in PHASES + ((NO_AGENT_PHASE,) if dave else ()):
            env.step(name)
        say("starting: 3 nodes, networks home (easy NAT, 2.1.1.1) and dc (one2one, 5.6.7.8)")
        env.start()

        if len(set(images)) > 1:
            say("OSes: " + ", ".join(f"{n.name}: {n.os}" for n in env.nodes))
        phase("LAN: alice <-> bob")
        for a, b in ((alice, bob), (bob, alice)):
            r = a.ping(b.lan_ip(), count=3)
            check(a.name, f"ping {b.name} on the LAN ({b.lan_ip()})", r.ok,
                  f"{r.received}/{r.transmitted} replies")

        phase("through the NAT: alice, bob -> carol's public address")
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

        phase("unsolicited: carol -> home")
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

        if dave is not None:
            phase(NO_AGENT_PHASE)
            r = _lan_ping(env, dave, timeout_s=60)
            check("dave", f"answers vnet's lan_ping at {dave.lan_ip()} (no agent)", r.ok,
                  f"after {r.transmitted} echo(es)" if r.ok else r.output)
            r = _lan_ping(env, dave, source=alice, timeout_s=60)
            check("alice", f"lan_ping dave ({dave.os.split(' (')[0]}) from the guest", r.ok,
                  f"{r.received}/{r.transmitted} replies" if r.ok else r.output)

        running.pop().end()
        failed_now = sum(not c.ok for c in checks)
        env.dashboard.test_status("failed" if failed_now else "passed",
                                  f"{len(checks) - failed_now}/{len(checks)} checks passed")
        table = Table(title=f"vmlab demo ({env.accel.name if hasattr(env.accel, 'name') else env.accel})")
        for col in ("node", "OS", "LAN IP", "WAN IP", "boot→agent s", "checks"):
            table.add_column(col)
        for node in env.nodes:
            mine = [c for c in checks if c.node == node.name]
            passed = sum(c.ok for c in mine)
            table.add_row(node.name, node.os.split(" (")[0], str(node.lan_ip()),
                          str(node.wan_ip()),
                          f"{node.boot_to_agent_s:.1f}",
                          f"[{'green' if passed == len(mine) else 'red'}]{passed}/{len(mine)} passed")
        out.print(table)
    failed = [c for c in checks if not c.ok]
    wall = time.monotonic() - t0
    out.print(f"{len(checks) - len(failed)} passed, {len(failed)} failed in {wall:.1f} s")
    for c in failed:
        out.print(f"[red]FAILED[/red] {c.node}: {c.what} ({c.detail})")
    return 1 if failed else 0
