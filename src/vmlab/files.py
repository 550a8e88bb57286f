"""Files to and from a running node: the host half of `Node.put` and `Node.get`.

Both move one tar archive, base64 in the agent's JSON (the agent's `/files/put` unpacks one
under a guest directory; `/files/get` packs a guest path as a single top entry named "x").
Fine for configuration, scripts and logs; the JSON body holds the whole archive in memory,
so multi-hundred-megabyte trees belong in a provisioning step or the image instead.
"""
from __future__ import annotations

import base64
import io
import os
import posixpath
import shutil
import tarfile
import tempfile
from pathlib import Path

from .errors import ConfigError

__all__ = ["pack", "unpack"]


def pack(local: Path, remote) -> tuple[str, str]:
    """(guest directory to unpack under, tar as base64) that puts `local` at `remote`: a
    file becomes the file `remote` (or, when `remote` ends in "/", the file of its own name
    in that folder, as with cp), a folder's content lands under the folder `remote`."""
    remote = guest_path(remote, "put")
    if not local.exists():
        raise ConfigError(f"put: local path {local} does not exist")
    if remote.endswith("/") and not local.is_dir():
        remote += local.name
    remote = posixpath.normpath(remote)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        if local.is_dir():
            dest = remote
            for child in sorted(local.iterdir()):
                tar.add(child, arcname=child.name)
        else:
            dest, name = posixpath.split(remote)
            if not name:
                raise ConfigError(f"put: {remote!r} names a folder; give the file's guest path")
            tar.add(local, arcname=name)
    return dest, base64.b64encode(buf.getvalue()).decode("ascii")


def guest_path(path, verb: str) -> str:
    """`path` (a str or PurePosixPath) as a str, if it is an absolute guest path."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"{verb}: {path!r} must be an absolute path in the guest, like "
                          f"'/opt/app'")
    return path


def unpack(tar_b64: str, local: Path) -> Path:
    """Write what `/files/get` returned to `local` (replacing a file or folder there)."""
    data = base64.b64decode(tar_b64)
    local.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=local.parent, prefix=".vmlab-get-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar.getmembers():
                if m.name != "x" and not m.name.startswith("x/") or ".." in m.name.split("/"):
                    raise ValueError(f"get: unexpected entry {m.name!r} in the agent's archive")
            # The names were checked above. Extraction filters came with Python 3.11.4; "tar"
            # keeps the guest's own absolute symlinks (fetching /etc must work), where "data"
            # would refuse them. Debian 12's python3 (3.11.2) has no filter= at all.
            if hasattr(tarfile, "tar_filter"):
                tar.extractall(tmp, filter="tar")
            else:
                tar.extractall(tmp)
        if local.is_dir() and not local.is_symlink():
            shutil.rmtree(local)
        elif local.exists() or local.is_symlink():
            local.unlink()
        Path(tmp, "x").rename(local)
    return local
