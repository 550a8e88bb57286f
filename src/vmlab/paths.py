"""Where vmlab keeps what it builds: the cache root, and a check that it is usable."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import EnvironmentProblem


def cache_root() -> Path:
    """`$VMLAB_CACHE`, else `$XDG_CACHE_HOME/vmlab`, else `~/.cache/vmlab`."""
    if os.environ.get("VMLAB_CACHE"):
        return Path(os.environ["VMLAB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vmlab"


def ensure_writable_dir(path: Path, what: str = "cache directory") -> Path:
    """Create `path` if needed and prove it is writable, or raise naming the fix."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise EnvironmentProblem(
            f"{what} {path} is not writable ({err.strerror}); "
            f"set VMLAB_CACHE to a writable directory or fix its permissions"
        ) from err
    return path


def give_back_to_sudo_user(path: Path) -> None:
    """Under `sudo -E` (image builds need root), hand what root wrote into the invoking user's
    cache back to that user, so their unprivileged runs can read it (SSH keys are 0600).
    Does nothing unless running as root for a SUDO_UID that owns the cache root."""
    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if os.geteuid() != 0 or not uid or not uid.isdigit():
        return
    uid_n, gid_n = int(uid), int(gid) if gid and gid.isdigit() else -1
    try:
        if cache_root().stat().st_uid != uid_n:
            return
    except OSError:
        return
    for top in [path, *([] if path.is_symlink() or not path.is_dir() else path.rglob("*"))]:
        try:
            os.chown(top, uid_n, gid_n, follow_symlinks=False)
        except OSError:
            pass
