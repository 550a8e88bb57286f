"""Run a piece of vmlab in an interpreter that lacks vmlab's dependencies (Debian's own
python3) or as another user, by loading its modules without the package's __init__."""
from __future__ import annotations

import subprocess
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vmlab"


def run(python: str, code: str, *args: str, subpackages: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (), stdin: str | None = None,
        package: Path = PACKAGE) -> subprocess.CompletedProcess:
    """`code` after empty `vmlab` (and `vmlab.<sub>`) packages are put in sys.modules, so its
    imports load only the modules they name; `args` are its sys.argv[1:]. `package`: where
    vmlab's sources are (a copy another user can read, say)."""
    prelude = ["import sys, types"]
    for sub in ("", *subpackages):
        name = "vmlab" + (f".{sub}" if sub else "")
        prelude.append(f"m = types.ModuleType({name!r}); m.__path__ = [{str(package / sub)!r}]; "
                       f"sys.modules[{name!r}] = m")
    return subprocess.run([*prefix, python, "-I", "-c", "\n".join(prelude) + "\n" + code, *args],
                          input=stdin, text=True, capture_output=True)
