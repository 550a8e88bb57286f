"""The `debian` image's figures: image build, snapshot preparation, cold boot vs restore.

Reads the build and preparation times the cache recorded (image.json, the snapshot's
meta.json; run it after they exist, e.g. after tests/test_vm_debian.py or `vmlab demo
--images appliance,debian`), then times single-node Envs: RESTORES restores and COLD cold
boots, each to agent-connected. Prints figures; asserts nothing.

`--fresh-build` first builds the image from nothing in a throwaway cache (as root; the Debian
packages are downloaded again) and prints the whole build's time next to debootstrap's.

    .venv/bin/python benchmarks/bench_debian_boot.py [--fresh-build] [RESTORES] [COLD]
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from vmlab import Env
from vmlab.images import ensure_image
from vmlab.snapshot.cache import list_entries


def one(cold: bool) -> tuple[float, str]:
    env = Env(name="bench-debian")
    lan = env.add_network(wan_ip="2.1.1.1", lan="192.168.1.0/24")
    node = env.add_node(lan, image="debian", cold_boot=cold)
    try:
        env.start()
        return node.boot_to_agent_s, node.boot_mode
    finally:
        env.close()


def fresh_build() -> None:
    """The whole build, package downloads included, in an empty cache that is removed after."""
    with tempfile.TemporaryDirectory(prefix="vmlab-bench-cache-") as tmp:
        before = os.environ.get("VMLAB_CACHE")
        os.environ["VMLAB_CACHE"] = tmp
        try:
            t0 = time.monotonic()
            image = ensure_image("debian", progress=lambda *a: None)
            build_s = time.monotonic() - t0
            meta = json.loads((image.disk.parent / "image.json").read_text())
        finally:
            if before is None:
                os.environ.pop("VMLAB_CACHE")
            else:
                os.environ["VMLAB_CACHE"] = before
    print(f"fresh build of {image.name} {image.digest[:12]}: {build_s:.1f} s in all, "
          f"debootstrap {meta['debootstrap_s']} s, disk {meta['disk_bytes'] / 1e6:.0f} MB")


def main() -> int:
    args = sys.argv[1:]
    if "--fresh-build" in args:
        args.remove("--fresh-build")
        fresh_build()
    restores = int(args[0]) if len(args) > 0 else 5
    colds = int(args[1]) if len(args) > 1 else 2
    if restores < 1 or colds < 0:
        print("usage: bench_debian_boot.py [RESTORES>=1] [COLD>=0]", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    image = ensure_image("debian")
    meta = json.loads((image.disk.parent / "image.json").read_text())
    print(f"image {image.name} {image.digest[:12]}: debootstrap {meta['debootstrap_s']} s, "
          f"disk {meta['disk_bytes'] / 1e6:.0f} MB (ensure now: {time.monotonic() - t0:.2f} s)")
    one(cold=False)  # warm-up: prepares the snapshot if it is missing
    for entry, m, problem in list_entries():
        if m.get("image") == "debian" and problem is None and not m.get("provision"):
            print(f"snapshot {entry.key}: prepared in {m['prepare_s']} s (SSH up "
                  f"{m.get('ssh_up_s')} s, agent waiting {m['boot_to_wait_s']} s), device "
                  f"state {m['state_bytes'] // 1024} KB, RAM {m['ram_used_bytes'] >> 20} MB used")
    rs = [one(cold=False) for _ in range(restores)]
    cs = [one(cold=True) for _ in range(colds)]
    for label, runs in (("restore", rs), ("cold boot", cs)):
        if not runs:
            continue
        times = [t for t, _mode in runs]
        modes = {mode for _t, mode in runs}
        print(f"{label:9} to agent-connected: min {min(times):.2f} s, median "
              f"{statistics.median(times):.2f} s over {len(times)} (modes {sorted(modes)})")
    if cs:
        print(f"cold / restore (medians): "
              f"{statistics.median(t for t, _ in cs) / statistics.median(t for t, _ in rs):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
