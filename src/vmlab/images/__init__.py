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

__all__ = ["BuiltImage", "ImageKind", "ImageSpec", "as_spec", "ensure_image", "list_images"]

# progress(message, done, total): done/total are None when the step has no count.
Progress = Callable[[str, Optional[int], Optional[int]], None]


@dataclass(frozen=True)
class BuiltImage:
    """A finished image in the cache.

    `kernel` is an uncompressed PVH-bootable vmlinux (QEMU `-kernel`; None for a cloud image,
    which boots its own bootloader from `disk`), `initrd` an uncompressed newc cpio,
    `kernel_args` the command line to boot them with (add `vmlab.hostname=NAME`,
    `vmlab.driver=IP:PORT` as needed). `digest` is a hex sha256 over every input of the image.
    """
    name: str
    digest: str
    kernel: Path | None
    initrd: Path | None
    kernel_args: str
    os: str
    memory_mb: int = 256
    #: the image's root disk (qcow2), or None for an image that lives in its initramfs;
    #: never written to: snapshots and nodes put their own qcow2 overlays on top of it
    disk: Path | None = None
    #: private key whose public half the guest's root accepts (disk images; snapshot
    #: preparation logs in with it to install the agent)
    ssh_key: Path | None = None
    #: the image kind (`appliance`, `debian`, `cloud`); `name` may carry a variant suffix
    kind: str = ""
    #: a NoCloud seed (cloud-init's `cidata` ISO) attached read-only next to the disk
    seed: Path | None = None
    #: a static busybox installed with the agent (/vmlab/bin/busybox) into an image that may
    #: have none: its udhcpc does a cold boot's DHCP and its ping serves the agent's /ping
    agent_busybox: Path | None = None


@dataclass(frozen=True)
class ImageKind:
    """One row of the image table: a name users type and the function that ensures it."""
    name: str
    description: str
    ensure: Callable[..., BuiltImage]  # ensure(*, force: bool, progress: Progress | None)
    #: boots from a qcow2 disk, gets its agent installed over SSH at snapshot preparation
    disk: bool = False
    #: a node's RAM unless add_node says otherwise
    memory_mb: int = 256


@dataclass(frozen=True)
class ImageSpec:
    """An image with options: `ImageSpec("debian", packages=("curl",))` or
    `ImageSpec("cloud", url="https://.../x.qcow2", sha256="...")`. A plain name is the same
    as `ImageSpec(name)`. `name` is the cache name: the kind plus a suffix per variant."""
    kind: str
    packages: tuple[str, ...] = ()
    url: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        # Everything is checked here, not at Env.start: a mistake must not cost an image build.
        kind = _KINDS.get(self.kind) if isinstance(self.kind, str) else None
        if kind is None:
            raise ConfigError(f"unknown image {self.kind!r}; known images: {', '.join(_KINDS)}")
        if self.packages and self.kind != "debian":
            raise ConfigError(f"image {self.kind!r} takes no packages; only 'debian' installs "
                              f"extra Debian packages (or provision the node)")
        if self.kind == "debian":
            from .debian import _check_packages
            object.__setattr__(self, "packages", _check_packages(self.packages))
        if (self.url or self.sha256) and self.kind != "cloud":
            raise ConfigError(f"image {self.kind!r} takes no url/sha256; use ImageSpec('cloud', ...)")
        if self.kind == "cloud":
            from .cloud import check_source
            url, sha256 = check_source(self.url, self.sha256)
            object.__setattr__(self, "url", url)
            object.__setattr__(self, "sha256", sha256)

    @property
    def name(self) -> str:
        if self.kind == "debian" and self.packages:
            from .debian import image_name
            return image_name(self.packages)
        if self.kind == "cloud":
            return f"cloud+{self.sha256.lower()[:12]}"
        return self.kind

    @property
    def disk(self) -> bool:
        return _KINDS[self.kind].disk

    @property
    def memory_mb(self) -> int:
        return _KINDS[self.kind].memory_mb

    def options(self) -> dict:
        if self.kind == "debian":
            return {"packages": self.packages}
        if self.kind == "cloud":
            return {"url": self.url, "sha256": self.sha256}
        return {}


def as_spec(image: "str | ImageSpec") -> ImageSpec:
    """`image` as an ImageSpec (a name becomes the kind's plain spec)."""
    return image if isinstance(image, ImageSpec) else ImageSpec(image)


def _ensure_appliance(*, force: bool = False, progress: Progress | None = None) -> BuiltImage:
    from . import appliance  # imported lazily: building needs nothing until it is asked for
    return appliance.ensure(force=force, progress=progress)


def _ensure_debian(*, force: bool = False, progress: Progress | None = None,
                   packages: tuple[str, ...] = ()) -> BuiltImage:
    from . import debian
    return debian.ensure(packages=packages, force=force, progress=progress)


def _ensure_cloud(*, force: bool = False, progress: Progress | None = None,
                  url: str | None = None, sha256: str | None = None) -> BuiltImage:
    from . import cloud
    return cloud.ensure(url=url, sha256=sha256, force=force, progress=progress)


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
    ImageKind("debian", "Debian 12 with systemd, openssh-server, python3 on a qcow2 disk "
                        "(debootstrap); extra packages with ImageSpec('debian', packages=[...])",
              _ensure_debian, disk=True),
    ImageKind("cloud", "any qcow2 by URL and sha256 with a NoCloud seed: "
                       "ImageSpec('cloud', url=..., sha256=...)", _ensure_cloud, disk=True,
              # a generic cloud image runs cloud-init and a full userspace
              memory_mb=512),
)


def list_images() -> list[ImageKind]:
    """Every image kind, in table order."""
    return list(_KINDS.values())


def ensure_image(name: "str | ImageSpec", *, progress: Progress | None = None,
                 force: bool = False) -> BuiltImage:
    """Return image `name` from the cache, building it first if it is missing or `force` is set.

    A cached image is returned without touching the network. `progress` receives one call per
    step; without it, concise lines go to stderr.

        >>> ensure_image("appliance").digest[:12]
    """
    if isinstance(name, str) and name not in _KINDS:
        raise ConfigError(f"unknown image {name!r}; known images: {', '.join(_KINDS)}")
    spec = as_spec(name)
    return _KINDS[spec.kind].ensure(force=force, progress=progress or _stderr_progress,
                                    **spec.options())


def _stderr_progress(message: str, done: int | None, total: int | None) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
