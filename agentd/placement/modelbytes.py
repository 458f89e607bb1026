"""Where a deployment's model files are: prefer hosts that hold them, and never send a fetch to a full disk.

Built once per placement from the host inventories (HostInventory.models, model_disk_free; see
docs/models.md). A host that holds a usable copy of the model ranks first among otherwise equal candidates
(Strategy.holders: after the hard filters and after llama.cpp's "can take layers"), and a host that would
have to fetch the files must have room for them in its model directory. The coordinator has already taken
the space promised to fetches in progress off `model_disk_free`. Which parts need the files at all is the
runtime's to say (agentd_model_file_roles): llama.cpp's rpc-servers get tensors over the network.

A cluster that reports no models (every cluster file written before issue 19) gets None: placement is
exactly what it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agentd.plugins.api import Layout, Rejection
from agentd.types import ClusterInventory, GiB, ModelInfo, held_copy


@dataclass(frozen=True)
class ModelBytes:
    holders: frozenset[str]
    size: int
    free: Mapping[str, int]  # host -> bytes free for a fetched copy; hosts that report none are not checked
    roles: frozenset[str] | None  # the part roles whose hosts need the files; None: every role

    def needs_files(self, role: str) -> bool:
        return self.roles is None or role in self.roles

    def check_layout(self, layout: Layout) -> Rejection | None:
        for p in layout.parts:
            if p.host in self.holders or not self.needs_files(p.role):
                continue
            free = self.free.get(p.host)
            if free is not None and free < self.size:
                return Rejection(
                    "host", "has too little free disk in its model directory to fetch the model",
                    f"needs {self.size / GiB:.2f} GiB, {max(free, 0) / GiB:.2f} GiB free", where=p.host,
                    details={"host": p.host, "needed": self.size, "free": free},
                    fix="free disk space in the model directory, or copy the model there")
        return None


def model_bytes(cluster: ClusterInventory, model_ref: str, model: ModelInfo,
                roles: frozenset[str] | None) -> ModelBytes | None:
    """The model's holders and sizes in `cluster`, or None when no host reports a model catalog."""
    if not any(h.models or h.model_disk_free is not None for h in cluster.hosts):
        return None
    holders = []
    size = 0
    for h in cluster.hosts:
        copy = held_copy(h.models, model_ref)
        if copy is not None:
            holders.append(h.name)
            size = max(size, copy.size)
    free = {h.name: h.model_disk_free for h in cluster.hosts if h.model_disk_free is not None}
    return ModelBytes(frozenset(holders), size or model.total_weight_bytes, free, roles)
