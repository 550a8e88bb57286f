"""Running the external tools an image build needs, with errors that say what to install."""
from __future__ import annotations

import subprocess

from ..errors import ImageBuildError

__all__ = ["run"]


def run(argv: list[str], what: str, timeout_s: float = 1800, **kw) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, **kw)
    except FileNotFoundError as err:
        raise ImageBuildError(f"{what}: {argv[0]} not found; install it (scripts/setup.sh "
                              f"lists the packages)") from err
    except subprocess.TimeoutExpired as err:
        raise ImageBuildError(f"{what}: {argv[0]} did not finish within {timeout_s:.0f} s") from err
    if proc.returncode != 0:
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc.stdout
