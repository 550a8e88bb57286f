"""Images: bootable bases with a digest that changes when their content changes.

One table, `_KINDS`, lists every image kind; it is checked when this module is imported (a
duplicate name raises). Each kind's recipe lives in its own module and caches its result under
`vmlab.paths.cache_root()` (layout in `cache.py`).

    >>> from vmlab.images import ensure_image
    >>> image = ensure_image("appliance")        # builds once, then returns from the cache
    >>> image.kernel, image.initrd, image.kernel_args
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import ConfigError

__all__ = ["BuiltImage", "ImageKind", "ensure_image", "list_images"]

# progress(message, done, total): done/total are None when the step has no count.
Progress = Callable[[str, Optional[int], Optional[int]], None]


@dataclass(frozen=True)
class BuiltImage:
    """A finished image in the cache.

    `kernel` is an uncompressed PVH-bootable vmlinux (QEMU `-kernel`), `initrd` an uncompressed
    newc cpio, `kernel_args` the command line to boot them with (add `vmlab.hostname=NAME`,
    `vmlab.driver=IP:PORT` as needed). `digest` is a hex sha256 over every input of the image.
    """
    name: str
    digest: str
    kernel: Path
    initrd: Path
    kernel_args: str
    os: str
    memory_mb: int = 256


@dataclass(frozen=True)
class ImageKind:
    """One row of the image table: a name users type and the function that ensures it."""
    name: str
    description: str
    ensure: Callable[..., BuiltImage]  # ensure(*, force: bool, progress: Progress | None)


def _ensure_appliance(*, force: bool = False, progress: Progress | None = None) -> BuiltImage:
    from . import appliance  # imported lazily: building needs nothing until it is asked for
    return appliance.ensure(force=force, progress=progress)


def _table(*kinds: ImageKind) -> dict[str, ImageKind]:
    table: dict[str, ImageKind] = {}
    for kind in kinds:
        if kind.name in table:
            raise ValueError(f"image kind {kind.name!r} is registered twice")
        table[kind.name] = kind
    return table


_KINDS = _table(
    ImageKind("appliance", "Debian cloud kernel + busybox + python3.11 + agent in an initramfs; "
                           "boots in a few seconds", _ensure_appliance),
)


def list_images() -> list[ImageKind]:
    """Every image kind, in table order."""
    return list(_KINDS.values())


def ensure_image(name: str, *, progress: Progress | None = None, force: bool = False) -> BuiltImage:
    """Return image `name` from the cache, building it first if it is missing or `force` is set.

    A cached image is returned without touching the network. `progress` receives one call per
    step; without it, concise lines go to stderr.

        >>> ensure_image("appliance").digest[:12]
    """
    kind = _KINDS.get(name)
    if kind is None:
        raise ConfigError(f"unknown image {name!r}; known images: {', '.join(_KINDS)}")
    return kind.ensure(force=force, progress=progress or _stderr_progress)


def _stderr_progress(message: str, done: int | None, total: int | None) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
