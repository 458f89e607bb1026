"""One host inventory: GPUs (NVML or a simulated file), host facts, name, address and labels.

`collect_inventory` never raises for a GPU problem: the host is still worth
reporting (its CPUs and RAM serve llama.cpp offload, and the coordinator must
hear from it to keep it alive), so every GPU failure becomes fewer GPUs plus
a warning. The only error it raises is InvalidInput for a bad simulated
file, because that is the operator's mistake to fix, not a hardware state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentd.inventory.host import HostProbe, Ownership, PsutilProbe
from agentd.inventory.models import DIGEST_CACHE, ModelCatalog
from agentd.inventory.nvml import GpuReading, NvmlReader
from agentd.inventory.ports import foreign_listeners
from agentd.inventory.simulated import HOST_FACT_KEYS, load_simulated, mark_simulated
from agentd.logs import fields
from agentd.types import GpuProcess, HostInventory

log = logging.getLogger("agentd.inventory")


def _no_pids() -> set[int]:
    return set()


def collect_inventory(
    *,
    node_name: str,
    address: str = "",
    labels: dict[str, str] | None = None,
    simulate: Path | None = None,
    nvml: Any = None,
    owned_pids: Callable[[], set[int]] = _no_pids,
    override_name: bool = False,
    probe: HostProbe | None = None,
) -> HostInventory:
    """This host as DESIGN.md §5 describes it.

    nvml: a pynvml-like module (tests pass agentd.inventory.fakenvml.FakeNvml),
      or an NvmlReader to keep NVML initialised across calls; None = real pynvml,
      initialised for this call only.
    owned_pids: pids agentd launched; GPU processes that are these or their
      descendants are marked owned=True.
    override_name: with `simulate`, report `node_name` instead of the file's
      own name (the daemon does; `agentd inventory --simulate` shows the file).
    probe: host facts and process lookups; psutil by default.
    """
    probe = probe or PsutilProbe()
    warnings: list[str] = []
    try:
        owned = set(owned_pids())
    except Exception as exc:
        warnings.append(f"cannot tell which GPU processes agentd owns ({exc}); all are shown as external")
        owned = set()
    is_owned = Ownership(owned, probe.parent_pid)
    if simulate is not None:
        return _simulated(Path(simulate), node_name, address, labels or {}, override_name, probe, is_owned, warnings)

    facts = probe.facts()
    reading = _read_gpus(nvml, is_owned, probe.process_name)
    return HostInventory(
        name=node_name, address=address, labels=dict(labels or {}),
        cpu_count=facts.cpu_count, memory_total=facts.memory_total, memory_available=facts.memory_available,
        load_average=facts.load_average, cpu_features=facts.cpu_features, gpus=reading.gpus, gpu_links=reading.links,
        warnings=(*warnings, *facts.warnings, *reading.warnings),
    )


def _read_gpus(nvml: Any, is_owned: Callable[[int], bool], process_name: Callable[[int], str]) -> GpuReading:
    reader = nvml if isinstance(nvml, NvmlReader) else NvmlReader(nvml)
    try:
        return reader.read(is_owned=is_owned, process_name=process_name)
    except Exception as exc:  # a bug or an NVML binding surprise must not take the host down
        log.exception("GPU inventory failed", extra=fields(error=str(exc)))
        return GpuReading(warnings=(f"GPU inventory failed unexpectedly ({type(exc).__name__}: {exc}): "
                                    "no GPUs reported",))
    finally:
        if reader is not nvml:
            reader.close()


def _simulated(path: Path, node_name: str, address: str, labels: dict[str, str], override_name: bool,
               probe: HostProbe, is_owned: Callable[[int], bool], warnings: list[str]) -> HostInventory:
    host, keys = load_simulated(path, default_name=node_name)
    update: dict[str, Any] = {"labels": {**host.labels, **labels}}
    if override_name:
        update["name"] = node_name
    if address:
        update["address"] = address
    missing = [k for k in HOST_FACT_KEYS if k not in keys]
    if missing:
        facts = probe.facts()
        update.update({k: getattr(facts, k) for k in missing})
        warnings.extend(facts.warnings)
    if any(p.pid and is_owned(p.pid) and not p.owned for g in host.gpus for p in g.processes):
        update["gpus"] = tuple(
            g.model_copy(update={"processes": tuple(_mark_owned(p, is_owned) for p in g.processes)})
            for g in host.gpus)
    update["warnings"] = (*host.warnings, *warnings)
    return mark_simulated(host.model_copy(update=update))


def _mark_owned(p: GpuProcess, is_owned: Callable[[int], bool]) -> GpuProcess:
    return p if p.owned or not is_owned(p.pid) else p.model_copy(update={"owned": True})


@dataclass
class Collector:
    """A ready-to-call collect for the refresher, built from settings; keeps NVML open between calls."""

    node_name: str
    address: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    simulate: Path | None = None
    owned_pids: Callable[[], set[int]] = _no_pids
    nvml: Any = None
    probe: HostProbe | None = None
    # Port ranges (model servers, Ray) in which listeners of other processes are reported (foreign_ports).
    port_ranges: tuple[tuple[int, int], ...] = ()
    # The models in this host's model directories (agentd.inventory.models); None reports none.
    catalog: ModelCatalog | None = None
    # The runtimes whose programs this host has, name -> version (the plugins' agentd_installed, asked by the
    # daemon); None reports none. A simulated inventory reports what its file says instead.
    runtimes: Callable[[], dict[str, str]] | None = None

    def __post_init__(self) -> None:
        self._reader = self.nvml if isinstance(self.nvml, NvmlReader) else NvmlReader(self.nvml)

    def __call__(self) -> HostInventory:
        inventory = collect_inventory(node_name=self.node_name, address=self.address, labels=self.labels,
                                      simulate=self.simulate, nvml=self._reader, owned_pids=self.owned_pids,
                                      override_name=True, probe=self.probe)
        if self.catalog is not None:
            inventory = inventory.model_copy(update={
                "models": self.catalog.scan(), "model_dirs": tuple(str(d) for d in self.catalog.dirs),
                "model_disk_free": self.catalog.disk_free()})
        if self.runtimes is not None and not inventory.simulated:
            inventory = inventory.model_copy(update={"runtimes": self.runtimes()})
        if not self.port_ranges:
            return inventory
        probe = self.probe or PsutilProbe()
        try:
            owned = {*self.owned_pids(), os.getpid()}  # agentd itself: its children are its model servers
        except Exception:
            owned = {os.getpid()}
        ports = foreign_listeners(self.port_ranges, Ownership(owned, probe.parent_pid))
        return inventory.model_copy(update={"foreign_ports": ports}) if ports else inventory

    def close(self) -> None:
        self._reader.close()
        if self.catalog is not None:
            self.catalog.close()

    @classmethod
    def from_settings(cls, settings: Any, *, owned_pids: Callable[[], set[int]] = _no_pids,
                      runtimes: Callable[[], dict[str, str]] | None = None) -> Collector:
        """The daemon's collect: its node name, advertised address, labels and simulate_inventory."""
        catalog = ModelCatalog(settings.model_directories, Path(settings.data_dir) / DIGEST_CACHE)
        return cls(node_name=settings.node_name, address=settings.advertise_address, labels=dict(settings.labels),
                   simulate=settings.simulate_inventory, owned_pids=owned_pids,
                   port_ranges=(tuple(settings.port_range), tuple(settings.ray_port_range)), catalog=catalog,
                   runtimes=runtimes)
