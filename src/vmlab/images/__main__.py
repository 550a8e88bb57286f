"""`python -m vmlab.images build NAME [--force]` and `python -m vmlab.images ls`, for manual use."""
from __future__ import annotations

import argparse
import sys
import time

from . import ensure_image, list_images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmlab.images")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or find in the cache) an image")
    build.add_argument("name")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    sub.add_parser("ls", help="list image kinds")
    args = parser.parse_args(argv)
    if args.command == "ls":
        for kind in list_images():
            print(f"{kind.name:12} {kind.description}")
        return 0
    t0 = time.monotonic()
    image = ensure_image(args.name, force=args.force)
    print(f"{image.name} {image.digest[:12]} ({time.monotonic() - t0:.2f} s)\n"
          f"  os      {image.os}\n  kernel  {image.kernel}\n  initrd  {image.initrd}"
          + (f" ({image.initrd.stat().st_size / 1e6:.1f} MB)" if image.initrd else "")
          + (f"\n  disk    {image.disk} ({image.disk.stat().st_size / 1e6:.0f} MB)"
             if image.disk else "") + f"\n  args    {image.kernel_args}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
