"""Debian packages for image recipes: resolve exact versions, download, verify and unpack.

Uses the host's apt (`apt-cache`, `apt-get download`, `dpkg-deb`), so its package lists decide
what is available; nothing is installed on the host. Downloads are kept in `<cache>/debs/` under
apt's own file names, so a version is fetched once and shared by every image.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageBuildError

__all__ = ["Deb", "resolve_candidates", "resolve_dependency", "download", "extract", "sha256_file"]


@dataclass(frozen=True)
class Deb:
    """One downloaded package: exact version and the sha256 of the .deb file."""
    name: str
    version: str
    sha256: str
    path: Path


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ImageBuildError(
            f"{name} not found: vmlab builds the appliance image from Debian packages with apt; "
            f"build on a Debian or Ubuntu host (or install apt)")
    return path


def _run(argv: list[str], *, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as err:
        raise ImageBuildError(f"{' '.join(argv)} did not finish within 600 s") from err
    if proc.returncode != 0:
        raise ImageBuildError(f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def resolve_candidates(names: list[str]) -> dict[str, str]:
    """{package: candidate version} from `apt-cache policy`, for each name.

    Raises ImageBuildError naming `apt-get update` when apt knows no candidate, which is what a
    host without package lists looks like.
    """
    out = _run([_tool("apt-cache"), "policy", *names])
    versions: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            versions[current] = line.split(":", 1)[1].strip()
    missing = [n for n in names if versions.get(n) in (None, "(none)")]
    if missing:
        raise ImageBuildError(
            f"apt knows no installable version of {', '.join(missing)}; the package lists are "
            f"missing or stale: run `apt-get update` (as root) and build again")
    return versions


def resolve_dependency(meta_package: str, prefix: str) -> str:
    """The first Depends of a meta package that starts with `prefix`.

    Example: resolve_dependency("linux-image-cloud-amd64", "linux-image-") ->
    "linux-image-6.1.0-57-cloud-amd64" (the concrete kernel the candidate depends on).
    """
    version = resolve_candidates([meta_package])[meta_package]
    out = _run([_tool("apt-cache"), "show", f"{meta_package}={version}"])
    for line in out.splitlines():
        if line.startswith(("Depends:", "Pre-Depends:")):
            for alt in line.split(":", 1)[1].split(","):
                name = alt.strip().split()[0]
                if name.startswith(prefix):
                    return name
    raise ImageBuildError(f"{meta_package}={version} depends on no package named {prefix}*")


def _deb_filename(name: str, version: str, arch: str) -> str:
    # apt-get download's naming: epoch colon URL-encoded as %3a.
    return f"{name}_{version.replace(':', '%3a')}_{arch}.deb"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(packages: dict[str, str], dest: Path, *, progress=None) -> dict[str, Deb]:
    """Make sure `name_version_*.deb` for each {name: version} is in `dest`; fetch what is missing.

    `progress(message, done, total)` is called once per package.
    """
    dest.mkdir(parents=True, exist_ok=True)
    result: dict[str, Deb] = {}
    todo = []
    for name, version in packages.items():
        found = [p for arch in ("amd64", "all") if (p := dest / _deb_filename(name, version, arch)).exists()]
        if found:
            result[name] = Deb(name, version, sha256_file(found[0]), found[0])
        else:
            todo.append(name)
    total = len(packages)
    if todo:
        apt_get = _tool("apt-get")
        with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as tmp:
            argv = [apt_get, "download"]
            if os.geteuid() == 0:
                # As root apt drops to the _apt user, which cannot write our cache directory.
                argv += ["-o", "APT::Sandbox::User=root"]
            if progress:
                progress(f"downloading {len(todo)} packages ({len(result)}/{total} cached): "
                         + " ".join(todo), len(result), total)
            _run(argv + [f"{n}={packages[n]}" for n in todo], cwd=Path(tmp))
            for name in todo:
                version = packages[name]
                got = [p for arch in ("amd64", "all") if (p := Path(tmp) / _deb_filename(name, version, arch)).exists()]
                if not got:
                    raise ImageBuildError(f"apt-get download {name}={version} left no .deb in {tmp}")
                final = dest / got[0].name
                os.replace(got[0], final)  # same filesystem: atomic, a partial .deb is never seen
                result[name] = Deb(name, version, sha256_file(final), final)
    if progress:
        progress(f"{total} packages ready", total, total)
    return result


def fetch_with_kernel(kernel_meta: str, names: list[str], dest: Path, *,
                      progress=None) -> tuple[str, dict[str, Deb], dict[str, dict]]:
    """Resolve the concrete kernel package behind `kernel_meta`, then download it and `names`.
    Returns (kernel package, the downloaded debs, {name: {version, sha256}} for digests)."""
    kernel_pkg = resolve_dependency(kernel_meta, "linux-image-")
    fetched = download(resolve_candidates([kernel_pkg, *names]), dest, progress=progress)
    pinned = {n: {"version": d.version, "sha256": d.sha256} for n, d in sorted(fetched.items())}
    return kernel_pkg, fetched, pinned


def extract(deb: Deb, dest: Path) -> None:
    """Unpack a .deb's files (not its scripts) into dest."""
    _run([_tool("dpkg-deb"), "-x", str(deb.path), str(dest)])
