"""CPU cost of the dashboard's screenshot loop per node (DESIGN.md budget: a thumbnail every
2 s per node at under 5% of a core per node).

Boots NODES nodes with the dashboard on and a guest that prints a line every second (so every
screendump differs and takes the full path: dump, decode, PNG + JPEG encode, publish). It then
measures host CPU (this process plus the QEMU processes) over a window with the feeds running
and one with them stopped; the difference, per node, is the loop's cost. It also times one
screendump and one thumbnail directly. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_dashboard_screens.py [NODES] [WINDOW_S]
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from pathlib import Path

from vmlab import Env
from vmlab.web.feeds import SCREEN_INTERVAL_S, make_thumbnail

TICK = os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def window(env: Env, seconds: float) -> tuple[float, float]:
    pids = [n.vm.pid for n in env.nodes]
    s0, q0 = self_cpu(), sum(proc_cpu(p) for p in pids)
    time.sleep(seconds)
    return self_cpu() - s0, sum(proc_cpu(p) for p in pids) - q0


def main() -> None:
    nodes = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    win = float(sys.argv[2]) if len(sys.argv) > 2 else 30.0
    env = Env(name="bench_dashboard", web="127.0.0.1:0")
    net = env.add_network(wan_ip="2.1.1.1", lan="192.168.1.0/24", nat="easy")
    for i in range(nodes):
        env.add_node(net, name=f"n{i + 1}")
    with env:
        env.start()
        for node in env.nodes:  # a changing screen: the costly path on every dump
            node.exec("(while true; do echo tick $(cat /proc/uptime); sleep 1; done) "
                      "> /run/console.fifo 2>&1 &")
        time.sleep(3)
        on_self, on_qemu = window(env, win)
        env._loop.call(env.dashboard.stop_feeds(), 10)
        off_self, off_qemu = window(env, win)

        vm = env.nodes[0].vm
        dump = Path(vm.cfg.run_dir) / "bench.ppm"
        qmp_ms = []
        for _ in range(10):
            t0 = time.perf_counter()
            env._loop.call(vm.qmp("screendump", filename=str(dump), format="ppm"), 10)
            qmp_ms.append((time.perf_counter() - t0) * 1000)
        data = dump.read_bytes()
        thumb_ms = []
        for _ in range(10):
            t0 = time.process_time()
            screen = make_thumbnail(data)
            thumb_ms.append((time.process_time() - t0) * 1000)

    per_node = ((on_self - off_self) + (on_qemu - off_qemu)) / win / nodes
    print(f"nodes {nodes}, window {win:.0f} s each, a dump every {SCREEN_INTERVAL_S:g} s per node")
    print(f"feeds on : vmlab process {on_self / win * 100:5.2f}% core, "
          f"QEMU {on_qemu / win * 100:6.2f}% core")
    print(f"feeds off: vmlab process {off_self / win * 100:5.2f}% core, "
          f"QEMU {off_qemu / win * 100:6.2f}% core")
    print(f"screenshot loop: {per_node * 100:.2f}% of a core per node "
          f"(budget 5%; vmlab side {(on_self - off_self) / win / nodes * 100:.2f}%, "
          f"QEMU side {(on_qemu - off_qemu) / win / nodes * 100:.2f}%)")
    print(f"one screendump (ppm, QMP round trip): median {statistics.median(qmp_ms):.1f} ms; "
          f"one thumbnail + PNG (CPU): median {statistics.median(thumb_ms):.1f} ms "
          f"({len(screen.png)} B PNG, {len(screen.thumbnail)} B thumbnail URI)")


if __name__ == "__main__":
    main()
