"""Provisioning: a named step (files, then commands) run once in a disk image's guest while
its snapshot is prepared, so every node restored from it starts provisioned.

    web = Provision("web", files={"/srv/index.html": b"hello"}, network=True,
                    commands=["apt-get update -q",
                              "apt-get install -y -q --no-install-recommends nginx-light"])
    env.add_node(lan, image="debian", provision=web)

Its `digest` (name, files' contents and modes, commands, in order) joins the snapshot key:
change any of it and the next run prepares a new snapshot; leave it and the provisioned VM is
restored as fast as the bare image. The commands run as root with /bin/sh over SSH before the
agent is installed; a non-zero exit fails the preparation with the command's output. Running
the step is `snapshot/prepare.py`'s job.

The guest has no network while it is provisioned unless `network=True`: then, for the step
only, it reaches what the host reaches through QEMU's user-mode NAT (a default route and a
resolver are set, and taken away again before the snapshot). Debian packages known up front
are better given to the image (`ImageSpec("debian", packages=[...])`): they are fetched on the
host and cached. Whatever the step downloads is frozen into the snapshot until its digest
changes.
"""
from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

__all__ = ["Provision"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")


@dataclass(frozen=True)
class Provision:
    """`files`: {absolute guest path: bytes, str (text) or a local Path (file or directory)};
    `commands`: shell command lines, run in order after the files are in place."""
    name: str
    commands: tuple[str, ...] = ()
    files: dict = field(default_factory=dict, hash=False, compare=False)
    timeout_s: float = 1800.0
    #: reach the host's network while the step runs (see the module docstring)
    network: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"Provision name {self.name!r} must be 1-32 of a-z 0-9 _ . - "
                              f"(it names the snapshot cache entry)")
        if isinstance(self.commands, (str, bytes)) or not hasattr(self.commands, "__iter__"):
            raise ConfigError(f"Provision {self.name!r}: commands must be a list of command "
                              f"lines (str), not {self.commands!r}")
        object.__setattr__(self, "commands", tuple(self.commands))
        for cmd in self.commands:
            if not isinstance(cmd, str) or not cmd.strip():
                raise ConfigError(f"Provision {self.name!r}: command {cmd!r} must be a non-empty "
                                  f"shell command line (a str; run by /bin/sh, so join an argv "
                                  f"with shlex.join)")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) \
                or not self.timeout_s > 0:
            raise ConfigError(f"Provision {self.name!r}: timeout_s={self.timeout_s!r} must be a "
                              f"positive number of seconds (for each command)")
        if not isinstance(self.files, dict):
            raise ConfigError(f"Provision {self.name!r}: files must be a dict of "
                              f"{{guest path: content}}, not {type(self.files).__name__}")
        for path, value in self.files.items():
            if not isinstance(path, str) or not path.startswith("/"):
                raise ConfigError(f"Provision {self.name!r}: file path {path!r} must be an "
                                  f"absolute path in the guest")
            if path == "/" or posixpath.normpath(path) != path:
                raise ConfigError(f"Provision {self.name!r}: file path {path!r} must name a file "
                                  f"(or, for a local folder, the guest folder) plainly: no "
                                  f"trailing '/', '..' or '//'")
            if isinstance(value, Path) and not value.exists():
                raise ConfigError(f"Provision {self.name!r}: local file {value} for {path} "
                                  f"does not exist")
            if not isinstance(value, (bytes, str, Path)):
                raise ConfigError(f"Provision {self.name!r}: {path} must be bytes, str or a "
                                  f"Path, not {type(value).__name__}")
        # Read local files now: the digest (the snapshot key) and what is installed must be
        # the same bytes, even if the files change while the Env runs.
        object.__setattr__(self, "_contents", self._read_files())
        paths = set(self._contents)
        for path in paths:
            parent = posixpath.dirname(path)
            while parent != "/":
                if parent in paths:
                    raise ConfigError(f"Provision {self.name!r}: {parent} is given as a file and "
                                      f"is also the folder of {path}")
                parent = posixpath.dirname(parent)

    def guest_files(self) -> dict[str, tuple[bytes, int]]:
        """{guest path: (content, mode)}, directories expanded, sorted; read at construction."""
        return dict(self._contents)

    def _read_files(self) -> dict[str, tuple[bytes, int]]:
        out: dict[str, tuple[bytes, int]] = {}
        for path, value in self.files.items():
            if isinstance(value, Path) and value.is_dir():
                for f in sorted(value.rglob("*")):
                    if f.is_file():
                        out[f"{path.rstrip('/')}/{f.relative_to(value).as_posix()}"] = \
                            (f.read_bytes(), f.stat().st_mode & 0o777)
            elif isinstance(value, Path):
                out[path] = (value.read_bytes(), value.stat().st_mode & 0o777)
            else:
                out[path] = (value.encode() if isinstance(value, str) else value, 0o644)
        return dict(sorted(out.items()))

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(f"provision v1 {self.name}\n".encode())
        for path, (data, mode) in self.guest_files().items():
            h.update(f"file {path} {mode:o} {hashlib.sha256(data).hexdigest()}\n".encode())
        for cmd in self.commands:
            h.update(f"cmd {len(cmd)} {cmd}\n".encode())
        if self.network:
            h.update(b"network\n")
        return h.hexdigest()
