"""The `vmlab` command: demo, image build/ls/cloud-qcow2, snapshot ls/prune, bench boot/vnet, doctor."""
from __future__ import annotations

import argparse
import logging
import re
import shutil
import subprocess
import sys
import time

from .errors import ConfigError, VmlabError


def _known_images(names: list[str], option: str, *, allow_cloud: bool = True) -> list[str]:
    """`names` if every one is an image kind; checked up front, before anything builds."""
    from .images import list_images
    known = [kind.name for kind in list_images() if allow_cloud or kind.name != "cloud"]
    if not names:
        raise ConfigError(f"{option}: no image named; known images: {', '.join(known)}")
    bad = [n for n in names if n not in known]
    if bad:
        why = (" ('cloud' needs a URL and sha256: use ImageSpec('cloud', ...) in Python)"
               if "cloud" in bad and not allow_cloud else "")
        raise ConfigError(f"{option}: unknown image {', '.join(map(repr, bad))}{why}; known "
                          f"images: {', '.join(known)}")
    return names


def _cmd_demo(args) -> int:
    from .demo import run_demo
    images = [i.strip() for i in (args.images or args.image).split(",") if i.strip()]
    _known_images(images, "demo --images", allow_cloud=False)
    return run_demo(images=images, web=args.web, web_keep=args.web_keep)


def _cmd_image_build(args) -> int:
    from .images import ensure_image, list_images
    # `cloud` needs a URL and sha256, so "all" means every kind that builds from nothing.
    names = args.names or [kind.name for kind in list_images() if kind.name != "cloud"]
    _known_images(names, "image build", allow_cloud=False)
    for name in names:
        t0 = time.monotonic()
        img = ensure_image(name, force=args.force)
        print(f"{name}: {img.digest[:12]} in {time.monotonic() - t0:.1f} s "
              f"(kernel {img.kernel}, initrd {img.initrd}"
              + (f", disk {img.disk}" if img.disk else "") + ")")
    return 0


def _cmd_image_cloud_qcow2(args) -> int:
    from .images import _stderr_progress, cloudbuild
    image = cloudbuild.ensure(force=args.force, progress=_stderr_progress)
    print(f"{image.path}\nsha256 {image.sha256}\n"
          f'ImageSpec("cloud", url="{image.url}",\n          sha256="{image.sha256}")')
    return 0


def _dir_mb(path) -> float:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file()) / 1e6


def _cmd_image_ls(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .images import list_images
    from .paths import cache_root
    root = cache_root() / "images"
    built = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if root.is_dir() else []
    table = Table(title=f"images (cache: {root})")
    table.add_column("image", no_wrap=True)
    table.add_column("what it is")
    table.add_column("built entries", overflow="fold")
    from .images import cloudbuild
    for kind in list_images():
        # <kind>-<digest12> or <kind>+<variant>-<digest12>: a bare prefix match would file
        # debian-cloud-qcow2-* (the local cloud build) under debian.
        entry = re.compile(rf"^{re.escape(kind.name)}(\+[^-]+)?-[0-9a-f]{{12}}$")
        lines = [f"{p.name} ({_dir_mb(p):.0f} MB)" for p in built if entry.match(p.name)]
        if kind.name == "cloud":
            lines += [f"{p.name} ({_dir_mb(p):.0f} MB; the source qcow2 `vmlab image "
                      f"cloud-qcow2` built)" for p in built
                      if p.name.startswith(f"{cloudbuild.NAME}-")]
        table.add_row(kind.name, kind.description, "\n".join(lines) or "not built")
    Console().print(table)
    return 0


def _cmd_snapshot_ls(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .snapshot.cache import list_entries, snapshots_dir
    entries = list_entries()
    table = Table(title=f"snapshots (cache: {snapshots_dir()})")
    table.add_column("key", overflow="fold", min_width=20)
    table.add_column("OS", overflow="fold")
    for col in ("RAM used", "prepared in", "state"):
        table.add_column(col, no_wrap=True)
    for entry, meta, problem in entries:
        table.add_row(entry.key, meta.get("os", "?"), f"{meta.get('ram_used_bytes', 0) >> 20} MB",
                      f"{meta.get('prepare_s', '?')} s",
                      "[green]OK" if problem is None else f"[red]BROKEN: {problem}")
    Console().print(table)
    return 0


def _cmd_snapshot_prune(args) -> int:
    from .snapshot.cache import prune
    removed = prune(all_entries=args.all)
    for name in removed:
        print(f"removed {name}")
    print(f"{len(removed)} removed")
    return 0


def _cmd_bench_boot(args) -> int:
    from .bench.boot import run_boot_bench
    return run_boot_bench(restores=args.restores, big=args.nodes)


def _cmd_bench_vnet(args) -> int:
    from .bench.vnet import main
    return main(frames=args.frames, vm=not args.no_vm, megabytes=args.megabytes,
                profile=args.profile)


def _cmd_doctor(args) -> int:
    """Report every check, carrying on past failures: a diagnosis should show all it can."""
    from .errors import VmlabError
    from .paths import cache_root, ensure_writable_dir
    from .vm.accel import choose_accel
    problems = 0
    qemu = shutil.which("qemu-system-x86_64")
    print(f"qemu-system-x86_64: {qemu or 'MISSING (sudo apt-get install qemu-system-x86 qemu-utils)'}")
    if qemu:
        print("  " + subprocess.run([qemu, "--version"], capture_output=True, text=True)
              .stdout.splitlines()[0])
    else:
        problems += 1
    try:
        print(f"cache: {ensure_writable_dir(cache_root())} (writable)")
    except VmlabError as err:
        print(f"cache: PROBLEM: {err}")
        problems += 1
    try:
        choice = choose_accel()
        print(f"accelerator: {choice.name} — {choice.reason}")
    except VmlabError as err:
        print(f"accelerator: PROBLEM: {err}")
        problems += 1
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmlab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v: info, -vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="boot three VMs on a simulated NAT'd internet and check it")
    p.add_argument("--image", default="appliance", help="the image of every node")
    p.add_argument("--images", default=None, metavar="A,B",
                   help="mixed OSes: nodes take these images in turn (e.g. appliance,debian); "
                        "with debian, an agent-less debian node is added and reached by lan_ping")
    p.add_argument("--web", nargs="?", const="", default=None, metavar="ADDR",
                   help="serve a live dashboard (default 127.0.0.1, port derived from the name)")
    p.add_argument("--web-keep", action="store_true",
                   help="keep the dashboard up after the demo until Ctrl-C")
    p.set_defaults(func=_cmd_demo)
    img = sub.add_parser("image", help="build or list guest images").add_subparsers(
        dest="image_command", required=True)
    p = img.add_parser("build", help="build images (all when none named)")
    p.add_argument("names", nargs="*")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_cmd_image_build)
    p = img.add_parser("cloud-qcow2", help="build a Debian generic cloud qcow2 here (GRUB, "
                       "cloud-init) and print the ImageSpec('cloud', ...) that boots it")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_cmd_image_cloud_qcow2)
    p = img.add_parser("ls", help="list known images")
    p.set_defaults(func=_cmd_image_ls)
    snap = sub.add_parser("snapshot", help="list or prune cached snapshots").add_subparsers(
        dest="snapshot_command", required=True)
    p = snap.add_parser("ls", help="list snapshot cache entries")
    p.set_defaults(func=_cmd_snapshot_ls)
    p = snap.add_parser("prune", help="remove broken entries and leftovers")
    p.add_argument("--all", action="store_true", help="remove every entry")
    p.set_defaults(func=_cmd_snapshot_prune)
    bench = sub.add_parser("bench", help="benchmarks that print figures").add_subparsers(
        dest="bench_command", required=True)
    p = bench.add_parser("boot", help="cold boot vs snapshot restore, Env.start, memory per node")
    p.add_argument("--restores", type=int, default=5, help="single-node restores to time")
    p.add_argument("--nodes", type=int, default=10, help="nodes in the large Env.start")
    p.set_defaults(func=_cmd_bench_boot)
    p = bench.add_parser("vnet", help="vnet frames/s on synthetic frames; guest TCP across NATs")
    p.add_argument("--frames", type=int, default=200_000, help="synthetic frames per path")
    p.add_argument("--megabytes", type=int, default=16, help="MiB the guests transfer")
    p.add_argument("--no-vm", action="store_true", help="synthetic frames only (no guests)")
    p.add_argument("--profile", action="store_true", help="print a cProfile of the frame path")
    p.set_defaults(func=_cmd_bench_vnet)
    p = sub.add_parser("doctor", help="check QEMU, the cache and the accelerator")
    p.set_defaults(func=_cmd_doctor)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except VmlabError as err:
        print(f"vmlab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
