"""`vmlab bench boot`: cold boot vs snapshot restore, Env.start of 2 and of N nodes, and the
unique memory of a restored node, all on the same image in one run.

Figures, not assertions: the machine may be shared and noisy, so the ratio (cold over
restore) is the figure to compare across machines. The last line is `key=value` pairs.
"""
from __future__ import annotations

import statistics
import time

from rich.console import Console
from rich.table import Table

from ..env import Env

__all__ = ["run_boot_bench", "node_memory_mb"]


def node_memory_mb(pid: int) -> tuple[float, float]:
    """(USS, PSS) of a process in MB from /proc/PID/smaps_rollup. USS counts only pages no
    other process maps, so pages restored clones share through the snapshot's RAM file
    count in PSS (split) but not in USS."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1])
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return uss / 1024, fields.get("Pss", 0) / 1024


def _start(nodes_per_net: list[int], *, cold: bool = False, name: str = "bench") -> tuple[Env, float]:
    env = Env(name=name, progress=lambda msg: None)
    for i, count in enumerate(nodes_per_net):
        net = env.add_network(wan_ip=f"2.1.{i + 1}.1", lan=f"192.168.{i + 1}.0/24", nat="easy")
        for _ in range(count):
            env.add_node(net, cold_boot=cold)
    t0 = time.monotonic()
    env.start()
    return env, time.monotonic() - t0


def run_boot_bench(*, restores: int = 5, big: int = 10) -> int:
    out = Console()
    say = Console(stderr=True)
    say.print("warming up: image and snapshot (prepared now if missing)")
    env, _ = _start([1], name="bench-warmup")
    env.close()

    say.print("cold boot (x2)")
    cold = []
    for _ in range(2):
        env, _ = _start([1], cold=True)
        cold.append(env.nodes[0].boot_to_agent_s)
        env.close()
    say.print(f"restore (x{restores})")
    restore = []
    for _ in range(restores):
        env, _ = _start([1])
        node = env.nodes[0]
        if node.boot_mode != "restore":
            say.print(f"[red]node cold-booted instead of restoring: {node.fallback_reason}")
        restore.append(node.boot_to_agent_s)
        env.close()
    say.print("Env.start: 2 nodes on two NAT'd networks (x3)")
    env2 = []
    for _ in range(3):
        env, wall = _start([1, 1])
        env2.append(wall)
        env.close()
    say.print(f"Env.start: {big} nodes")
    per_net = [2] * (big // 2) + ([1] if big % 2 else [])
    env, env_big = _start(per_net)
    try:
        for node in env.nodes:  # touch every node once, as a test would
            node.exec("true")
        mem = [node_memory_mb(node.vm.pid) for node in env.nodes]
    finally:
        env.close()

    cold_s = statistics.median(cold)
    restore_s = statistics.median(restore)
    uss = statistics.mean(m[0] for m in mem)
    pss = statistics.mean(m[1] for m in mem)
    table = Table(title="vmlab bench boot (to agent connected)")
    table.add_column("what")
    table.add_column("figure", justify="right")
    table.add_column("runs")
    table.add_row("cold boot", f"{cold_s:.2f} s", " ".join(f"{x:.2f}" for x in cold))
    table.add_row("restore from snapshot", f"{restore_s:.2f} s", " ".join(f"{x:.2f}" for x in restore))
    table.add_row("ratio cold/restore", f"{cold_s / restore_s:.1f}x", "medians")
    table.add_row("Env.start, 2 nodes, 2 NAT'd networks", f"{statistics.median(env2):.2f} s",
                  " ".join(f"{x:.2f}" for x in env2))
    table.add_row(f"Env.start, {big} nodes", f"{env_big:.2f} s", "1")
    table.add_row("unique memory per restored node (USS)", f"{uss:.0f} MB",
                  f"PSS {pss:.0f} MB, {len(mem)} nodes")
    out.print(table)
    out.print(f"cold_s={cold_s:.2f} restore_s={restore_s:.2f} ratio={cold_s / restore_s:.1f} "
              f"env2_s={statistics.median(env2):.2f} env{big}_s={env_big:.2f} node_mb={uss:.0f}")
    return 0
