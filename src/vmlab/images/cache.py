"""The image cache: where built images live, how they are published, and the digest rule.

Layout under `vmlab.paths.cache_root()`:
    debs/                               downloaded .deb files, shared by all images
    images/<name>-<digest12>/           one finished image: its files plus image.json
    images/<name>.resolved.json         the package set last resolved for a recipe key
    images/.build-<name>-XXXX/          a build in progress (never read; removed on failure)

An entry is built in a temporary directory beside its final place and published with one
atomic rename, so a half-written entry is never used. Publishing removes older entries of the
same image.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..paths import cache_root, ensure_writable_dir, give_back_to_sudo_user

__all__ = ["images_dir", "debs_dir", "digest_of", "entry_dir", "building", "publish", "remove_stale",
           "load_manifest", "save_manifest", "read_entry_meta"]

log = logging.getLogger("vmlab.images")


def images_dir() -> Path:
    return ensure_writable_dir(cache_root() / "images", "image cache")


def debs_dir() -> Path:
    return ensure_writable_dir(cache_root() / "debs", "package cache")


def digest_of(inputs: object) -> str:
    """sha256 of a JSON-able structure, serialised canonically (sorted keys, no spaces)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def entry_dir(name: str, digest: str) -> Path:
    return cache_root() / "images" / f"{name}-{digest[:12]}"


@contextmanager
def building(name: str):
    """A fresh temporary directory inside the image cache, removed unless published."""
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=images_dir()))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, name: str, digest: str, *, replace: bool = False) -> Path:
    """Atomically rename a finished build to its entry, then remove older entries of `name`.

    If the entry exists, another process published the same digest and it is kept, unless
    `replace` (a forced rebuild): then the new build takes its place and the snapshots made
    on the old one are removed with it, since a frozen disk overlay or a saved page cache
    matches only the exact disk it was made on."""
    final = entry_dir(name, digest)
    out = tmp / "entry"
    if replace and final.exists():
        old = tmp / "replaced"
        os.rename(final, old)  # same directory tree: atomic; removed with `tmp`
        from ..snapshot.cache import remove_built_on  # the snapshot cache imports this module
        for key in remove_built_on(name, digest):
            log.info("removed snapshot %s, made on the replaced image %s", key, final.name)
    try:
        os.rename(out, final)
    except OSError:
        if not (final / "image.json").exists():  # someone else published the same digest: fine
            raise
    remove_stale(name, keep=final)
    give_back_to_sudo_user(cache_root())
    return final


def remove_stale(name: str, keep: Path) -> None:
    root = cache_root() / "images"
    for path in root.glob(f"{name}-*"):
        # <name>-<12 hex>, and not a longer image name that happens to share the prefix.
        suffix = path.name[len(name) + 1:]
        if path != keep and path.is_dir() and len(suffix) == 12 and all(c in "0123456789abcdef" for c in suffix):
            shutil.rmtree(path, ignore_errors=True)


def load_manifest(path: Path, key: str) -> dict | None:
    """The package set a recipe resolved last time, if it was resolved for this `key` (the
    recipe's local inputs): a cached build then needs no apt command at all."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("packages") if data.get("recipe_key") == key else None


def save_manifest(path: Path, key: str, packages: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"recipe_key": key, "packages": packages}, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_entry_meta(name: str, digest: str) -> tuple[Path, dict] | None:
    """(entry directory, its image.json) of a published image, or None if unreadable."""
    entry = entry_dir(name, digest)
    try:
        return entry, json.loads((entry / "image.json").read_text())
    except (OSError, ValueError):
        return None
