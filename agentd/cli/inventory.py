"""`agentd inventory`: this host's GPUs, RAM and CPUs, as the daemon would report them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agentd.cli.common import emit
from agentd.config import load_settings
from agentd.inventory import collect_inventory
from agentd.types import GiB, HostInventory


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inventory", parents=parents, help="show this host's GPUs, memory and CPUs",
        description="Show this host's inventory: NVIDIA GPUs through NVML (index in PCI bus order, memory used "
        "including other processes', the processes on each GPU), CPUs, RAM and load. With --json it prints the "
        "host-inventory format that cluster files and --simulate files use. GPUs that cannot be read are left "
        "out with a warning; the command still succeeds.")
    p.add_argument("--simulate", metavar="FILE", type=Path, default=None,
                   help="report the host described by this host-inventory JSON file instead of the hardware "
                   "(default: the simulate_inventory setting)")
    p.set_defaults(func=cmd_inventory)


def cmd_inventory(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.simulate is not None:
        # An explicit file is shown as it is written: its own name, address and labels.
        host = collect_inventory(node_name=settings.node_name, simulate=args.simulate)
    else:
        # Exactly what the daemon reports, simulated or not.
        host = collect_inventory(node_name=settings.node_name, address=settings.advertise_address,
                                 labels=dict(settings.labels), simulate=settings.simulate_inventory,
                                 override_name=True)
        if not host.simulated:  # the runtimes the plugins find here, as the daemon reports them
            from agentd.plugins import PluginManager

            plugins = PluginManager.load(allow=settings.plugins, disable=settings.disable_plugins)
            host = host.model_copy(update={"runtimes": plugins.installed_runtimes(settings)})
    emit(args, json.loads(host.model_dump_json()), lambda: render(host))
    return 0


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def render(host: HostInventory) -> str:
    """The human table: one line per GPU, its processes beneath, warnings last."""
    sim = " (SIMULATED)" if host.simulated else ""
    lines = [f"host {host.name}{sim}" + (f"  address {host.address}" if host.address else "")
             + ("  labels " + ",".join(f"{k}={v}" for k, v in sorted(host.labels.items())) if host.labels else "")]
    load = f"  load {host.load_average:.2f}" if host.load_average is not None else ""
    lines.append(f"cpus {host.cpu_count}  memory {_gib(host.memory_available)}/{_gib(host.memory_total)} GiB "
                 f"available{load}")
    if not host.gpus:
        lines.append("no GPUs")
    else:
        rows = [("IDX", "NAME", "USED/TOTAL GiB", "FREE GiB", "UTIL", "CC", "PCI BUS", "UUID")]
        for g in host.gpus:
            tags = [t for t, on in (("MIG of " + g.parent_uuid, g.mig), ("SIMULATED", g.simulated)) if on]
            rows.append((str(g.index), g.name or "?", f"{_gib(g.memory_used)}/{_gib(g.memory_total)}",
                         _gib(g.memory_free), f"{g.utilization:.0%}", g.compute_capability or "?",
                         g.pci_bus_id or "-", g.uuid + (f"  [{', '.join(tags)}]" if tags else "")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for i, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
            if i == 0:
                continue
            for p in host.gpus[i - 1].processes:
                owner = "agentd" if p.owned else "external"
                lines.append(f"    pid {p.pid:<8} {_gib(p.memory_used):>6} GiB  {owner:<8}  {p.name}".rstrip())
    lines += _links(host)
    if host.runtimes:
        lines.append("runtimes " + ", ".join(f"{k} {v}".strip() for k, v in host.runtimes.items()))
    lines += [f"warning: {w}" for w in host.warnings]
    return "\n".join(lines)


def _links(host: HostInventory) -> list[str]:
    """The GPU links as nvidia-smi topo -m shows them: NV# for NVLink, the PCIe path, ? when unknown."""
    if not host.gpu_links:
        return []
    links = {link.gpus: link for link in host.gpu_links}
    index = sorted({i for pair in links for i in pair})

    def cell(a: int, b: int) -> str:
        link = links.get((min(a, b), max(a, b)))
        if a == b:
            return "X"
        if link is None or link.link == "unknown":
            return "?"
        if link.link == "nvlink":
            return f"NV{link.nvlinks}" if link.nvlinks else "NV"
        return link.path or "PCIe"

    rows = [["links", *(f"GPU{i}" for i in index)]] + [[f"GPU{a}", *(cell(a, b) for b in index)] for a in index]
    return ["  ".join(c.ljust(6) for c in row).rstrip() for row in rows]
