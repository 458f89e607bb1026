"""Per-host runtime supervision: the processes of the assignments that name this host.

`Supervisor` is the entry point (docs/runtime.md); plugins build
`ProcessSpec`s in their `agentd_launch` hook.
"""

from agentd.runtime.backoff import Backoff, BackoffPolicy
from agentd.runtime.spec import (
    Endpoint,
    HealthVerdict,
    HttpProbe,
    InstanceStatus,
    LaunchContext,
    ProbeResult,
    ProcessSpec,
    ProcessStatus,
    TcpProbe,
)
from agentd.runtime.states import Event, State
from agentd.runtime.supervisor import Supervisor, SupervisorConfig

__all__ = [
    "Backoff", "BackoffPolicy", "Endpoint", "Event", "HealthVerdict", "HttpProbe", "InstanceStatus",
    "LaunchContext", "ProbeResult", "ProcessSpec", "ProcessStatus", "State", "Supervisor", "SupervisorConfig",
    "TcpProbe",
]
