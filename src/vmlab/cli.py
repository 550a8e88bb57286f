"""The `vmlab` command: demo, image build/ls, doctor."""
from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time

from .errors import VmlabError


def _cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(image=args.image)


def _cmd_image_build(args) -> int:
    from .images import ensure_image, list_images
    names = args.names or [kind.name for kind in list_images()]
    for name in names:
        t0 = time.monotonic()
        img = ensure_image(name, force=args.force)
        print(f"{name}: {img.digest[:12]} in {time.monotonic() - t0:.1f} s "
              f"(kernel {img.kernel}, initrd {img.initrd})")
    return 0


def _cmd_image_ls(args) -> int:
    from .images import list_images
    for kind in list_images():
        print(f"{kind.name:12} {kind.description}")
    return 0


def _cmd_doctor(args) -> int:
    from .paths import cache_root, ensure_writable_dir
    from .vm.accel import choose_accel
    qemu = shutil.which("qemu-system-x86_64")
    print(f"qemu-system-x86_64: {qemu or 'MISSING (sudo apt-get install qemu-system-x86 qemu-utils)'}")
    if qemu:
        print("  " + subprocess.run([qemu, "--version"], capture_output=True, text=True)
              .stdout.splitlines()[0])
    root = ensure_writable_dir(cache_root())
    print(f"cache: {root} (writable)")
    choice = choose_accel()
    print(f"accelerator: {choice.name} — {choice.reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmlab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="boot three VMs on a simulated NAT'd internet and check it")
    p.add_argument("--image", default="appliance")
    p.set_defaults(func=_cmd_demo)
    img = sub.add_parser("image", help="build or list guest images").add_subparsers(
        dest="image_command", required=True)
    p = img.add_parser("build", help="build images (all when none named)")
    p.add_argument("names", nargs="*")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_cmd_image_build)
    p = img.add_parser("ls", help="list known images")
    p.set_defaults(func=_cmd_image_ls)
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
