"""vmlab's error tree.

    VmlabError                      everything vmlab raises derives from this
    ├── ConfigError                 the Env spec is invalid (bad image name, overlapping LANs, ...)
    ├── EnvironmentProblem          the host cannot do what is asked (QEMU missing, cache not writable)
    ├── StateError                  a method was called in the wrong state
    ├── VmlabTimeout                a wait ran out; carries the last observation
    │   └── AgentTimeout            a node's agent did not connect in time; carries the console tail
    ├── NodeCrashed                 a node's QEMU process exited
    ├── ImageBuildError             building an image failed
    └── AgentError                  the agent answered with an error or the connection broke
        └── CommandFailed           Node.exec(check=True) saw a non-zero exit (a test failure, not a vmlab bug)

Test failures (the guest did not do what the test expected) are `CommandFailed`;
everything else means vmlab or the host failed.
"""
from __future__ import annotations

__all__ = [
    "VmlabError", "ConfigError", "EnvironmentProblem", "StateError", "VmlabTimeout",
    "AgentTimeout", "NodeCrashed", "ImageBuildError", "AgentError", "CommandFailed",
]


class VmlabError(Exception):
    """Root of every error vmlab raises."""


class ConfigError(VmlabError, ValueError):
    """The Env specification is invalid; the message says what to change."""


class EnvironmentProblem(VmlabError):
    """The host lacks something vmlab needs; the message says how to get it."""


class StateError(VmlabError):
    """A method was called in a state that does not allow it."""


class VmlabTimeout(VmlabError, TimeoutError):
    """A bounded wait ran out. `last` holds what was last observed."""

    def __init__(self, message: str, last: object = None):
        super().__init__(message)
        self.last = last


class AgentTimeout(VmlabTimeout):
    """A node's agent did not connect within the budget."""

    def __init__(self, message: str, node: str, console_tail: str = ""):
        super().__init__(message, last=console_tail)
        self.node = node
        self.console_tail = console_tail


class NodeCrashed(VmlabError):
    """A node's hypervisor process exited while the node was expected to run."""


class ImageBuildError(VmlabError):
    """An image could not be built."""


class AgentError(VmlabError):
    """The agent reported an error, or the connection to it broke."""


class CommandFailed(AgentError, AssertionError):
    """A command run with check=True exited non-zero. Keeps every fact about the run."""

    def __init__(self, node: str, argv, exit_code: int, stdout: str, stderr: str):
        self.node, self.argv, self.exit_code = node, argv, exit_code
        self.stdout, self.stderr = stdout, stderr
        super().__init__(
            f"{node}: {argv!r} exited {exit_code}\n"
            f"--- stdout (tail) ---\n{stdout[-2000:]}\n--- stderr (tail) ---\n{stderr[-2000:]}"
        )
