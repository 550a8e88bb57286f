"""SSH into a guest through a forwarded port, with the system `ssh` client.

Used only while a disk image's snapshot is prepared: the guest is reached over QEMU user
networking (`PrepNic`), the agent and the provisioning step are pushed in, and then the NIC
goes away. The system OpenSSH client (openssh-client, in scripts/setup.sh) is used rather
than paramiko: it is already on every Debian host, needs no Python dependency, and a
preparation makes a handful of connections, so process start-up costs nothing that matters.
Host keys are not checked: the guest is our own freshly booted image on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import io
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import EnvironmentProblem, VmlabError, VmlabTimeout

__all__ = ["SshTarget", "SshFailed", "tar_bytes"]


class SshFailed(VmlabError):
    """A command run over SSH exited non-zero; keeps the command, exit code and output."""

    def __init__(self, what: str, command: str, exit_code: int, output: str):
        self.command, self.exit_code, self.output = command, exit_code, output
        super().__init__(f"{what}: `{command[:200]}` exited {exit_code} over SSH; output "
                         f"(tail):\n{output[-2000:]}")


@dataclass(frozen=True)
class SshTarget:
    """root@127.0.0.1:`port`, logging in with `key`."""
    port: int
    key: Path
    user: str = "root"

    def argv(self, command: str, *, connect_timeout_s: int = 5) -> list[str]:
        ssh = shutil.which("ssh")
        if ssh is None:
            raise EnvironmentProblem("ssh not found: preparing a disk image's snapshot logs in "
                                     "over SSH; install openssh-client (scripts/setup.sh does)")
        if not os.access(self.key, os.R_OK):
            # ssh would exit 255, which looks like "sshd not up yet" and is retried for minutes.
            raise EnvironmentProblem(
                f"the image's SSH key {self.key} is not readable by this user (uid "
                f"{os.getuid()}; was the image built as root?); give the cache back with "
                f"`sudo chown -R $USER {self.key.parent.parent.parent}`, or build as this user")
        return [ssh, "-i", str(self.key), "-p", str(self.port),
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", f"ConnectTimeout={connect_timeout_s}",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=6",
                f"{self.user}@127.0.0.1", command]

    async def run(self, command: str, *, stdin: bytes | None = None, timeout_s: float = 600,
                  what: str = "ssh") -> tuple[int, str]:
        """(exit code, stdout+stderr). Exit 255 is ssh's own failure (not connected yet...)."""
        proc = await asyncio.create_subprocess_exec(
            *self.argv(command), stdin=asyncio.subprocess.PIPE if stdin is not None else
            asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
        except asyncio.TimeoutError:
            await _reap(proc)
            raise VmlabTimeout(f"{what}: `{command[:200]}` did not finish within {timeout_s:.0f} s "
                               f"over SSH", last=command) from None
        except BaseException:
            # Cancelled (the preparation gave up, or QEMU exited): no ssh client outlives it.
            await asyncio.shield(_reap(proc))
            raise
        return proc.returncode, out.decode("utf-8", "replace")

    async def check(self, command: str, *, stdin: bytes | None = None, timeout_s: float = 600,
                    what: str = "ssh") -> str:
        code, out = await self.run(command, stdin=stdin, timeout_s=timeout_s, what=what)
        if code != 0:
            raise SshFailed(what, command, code, out)
        return out

    async def wait_up(self, timeout_s: float, *, what: str = "ssh") -> float:
        """Until `true` runs over SSH; returns the seconds it took. Retries ssh's own
        failures (exit 255: the guest's sshd is not up yet) until `timeout_s`."""
        t0 = time.monotonic()
        last = ""
        while True:
            code, out = await self.run("true", timeout_s=30, what=what)
            if code == 0:
                return time.monotonic() - t0
            last = out.strip() or f"exit {code}"
            if time.monotonic() - t0 > timeout_s:
                raise VmlabTimeout(f"{what}: SSH to 127.0.0.1:{self.port} did not answer within "
                                   f"{timeout_s:.0f} s (last: {last})", last=last)
            await asyncio.sleep(1.0)

    async def put_tar(self, data: bytes, dest: str = "/", *, what: str = "ssh") -> None:
        """Unpack a tar archive (see `tar_bytes`) under `dest` in the guest."""
        await self.check(f"mkdir -p '{dest}' && tar -x -C '{dest}' -f -", stdin=data, what=what)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
    await proc.wait()


def tar_bytes(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A tar archive of {path in the guest: (content, mode)}; owner root, fixed mtime."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
