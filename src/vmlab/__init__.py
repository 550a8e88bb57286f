"""vmlab: integration tests on real OSes in VMs, wired together by a simulated network."""
from .env import Env, ExecResult, HttpResponse, Network, Node, PingResult
from .errors import (AgentError, AgentTimeout, CommandFailed, ConfigError, EnvironmentProblem,
                     NodeCrashed, StateError, VmlabError, VmlabTimeout)
from .images import ImageSpec
from .snapshot.provision import Provision
from .vnet.nat import NatBehavior, NatType

__all__ = [
    "Env", "Network", "Node", "ExecResult", "PingResult", "HttpResponse", "NatBehavior", "NatType",
    "ImageSpec", "Provision",
    "VmlabError", "ConfigError", "EnvironmentProblem", "StateError", "VmlabTimeout",
    "AgentTimeout", "NodeCrashed", "AgentError", "CommandFailed",
]
