"""binpack and spread: the tie-breaker after every rule and score.

binpack fills the hosts and GPUs that are already the fullest, keeping whole
hosts free for large models. spread puts each replica of a deployment on the
host with the fewest of its replicas so far, then on the emptiest host, so a
host failure takes as few replicas down as possible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agentd.placement.snapshot import HostView


@dataclass(frozen=True)
class Strategy:
    name: str = "binpack"
    replicas_on: Mapping[str, int] = field(default_factory=dict)  # this plan's replicas placed per host
    # Hosts that already hold the model's files (docs/models.md): preferred before the strategy's own order.
    holders: frozenset[str] = frozenset()

    @property
    def binpack(self) -> bool:
        return self.name != "spread"

    def host_key(self, hv: HostView) -> tuple:
        """Smaller is preferred."""
        if self.holders:
            fetch = hv.name not in self.holders
            if self.binpack:
                return (fetch, 0, -hv.used_fraction, hv.name)
            return (fetch, self.replicas_on.get(hv.name, 0), hv.used_fraction, hv.name)
        if self.binpack:
            return (0, -hv.used_fraction, hv.name)
        return (self.replicas_on.get(hv.name, 0), hv.used_fraction, hv.name)
