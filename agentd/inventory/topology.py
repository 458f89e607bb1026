"""Which GPU pairs of this host are joined by NVLink (directly or through NVSwitch) and which only by PCIe.

Placement's vLLM policy runs tensor parallel over NVLink and pipeline stages
over PCIe (docs/placement.md), so each pair of whole GPUs gets one GpuLink:

- **nvlink** when NVML says peer-to-peer over NVLink works between them
  (`nvmlDeviceGetP2PStatus(..., NVML_P2P_CAPS_INDEX_NVLINK)`), or when an
  active NVLink of one ends at the other (`nvmlDeviceGetNvLinkState`,
  `nvmlDeviceGetNvLinkRemotePciInfo`), or both have active links to
  NVSwitches. `nvlinks` counts the direct links, or through switches the
  fewer of the two GPUs' switch links (what `nvidia-smi topo -m` shows as NV#).
- **pcie** otherwise, when `nvmlDeviceGetTopologyCommonAncestor` names the
  closest common PCIe ancestor (`path`: PIX, PXB, PHB, NODE, SYS, the names
  `nvidia-smi topo -m` uses).
- **unknown** when neither could be read; one warning says why.

MIG instances get no links (TP does not span MIG instances), with a warning.
The topology does not change while the host runs, so the reader keeps it for
as long as the same GPUs are present: reading every link of every GPU costs
a few hundred NVML calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agentd.types import GpuLink

# NVML constants, used when the module lacks them.
_P2P_CAPS_INDEX_NVLINK = 2
_P2P_STATUS_OK = 0
_FEATURE_ENABLED = 1
_DEVICE_TYPE_SWITCH = 2
_MAX_LINKS = 18  # NVLink links per GPU on Hopper; NVML answers past a GPU's last link with an error
_NOT_SUPPORTED = 3

# nvmlGpuTopologyLevel_t -> nvidia-smi's names.
PATHS = {0: "SAME", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}


@dataclass(frozen=True)
class TopologyGpu:
    """A whole GPU (not a MIG instance) with its reported index, NVML handle and PCI bus id."""

    index: int
    handle: Any
    bus_id: str


@dataclass
class _Ends:
    """Where one GPU's active NVLinks go: other GPUs by PCI bus id, and how many go to NVSwitches."""

    to_bus: dict[str, int]
    to_switch: int
    readable: bool  # False when the per-link queries failed with an error other than NotSupported


def _code(nv: Any, name: str, default: int) -> int:
    return getattr(nv, name, default)


def _bus_key(bus_id: Any) -> str:
    text = bus_id.decode(errors="replace") if isinstance(bus_id, bytes | bytearray) else str(bus_id)
    text = text.strip().lower()
    # "00000000:18:00.0" and "0000:18:00.0" name the same function: compare without the domain's width.
    domain, _, rest = text.partition(":")
    return f"{int(domain or '0', 16):x}:{rest}" if rest else text


def _link_ends(nv: Any, gpu: TopologyGpu, problems: list[str]) -> _Ends:
    ends = _Ends({}, 0, True)
    state = getattr(nv, "nvmlDeviceGetNvLinkState", None)
    remote = getattr(nv, "nvmlDeviceGetNvLinkRemotePciInfo", None)
    if state is None or remote is None:
        return ends
    kind_of = getattr(nv, "nvmlDeviceGetNvLinkRemoteDeviceType", None)
    enabled = _code(nv, "NVML_FEATURE_ENABLED", _FEATURE_ENABLED)
    switch = _code(nv, "NVML_NVLINK_DEVICE_TYPE_SWITCH", _DEVICE_TYPE_SWITCH)
    for link in range(int(_code(nv, "NVML_NVLINK_MAX_LINKS", _MAX_LINKS))):
        try:
            if state(gpu.handle, link) != enabled:
                continue
            if kind_of is not None and kind_of(gpu.handle, link) == switch:
                ends.to_switch += 1
                continue
            bus = _bus_key(remote(gpu.handle, link).busId)
        except Exception as exc:
            # Past the GPU's last link NVML answers InvalidArgument (or NotSupported on GPUs without
            # NVLink): the end of the list. Another error on the first link means we cannot tell.
            code = getattr(exc, "value", None)
            if link == 0 and code not in (_code(nv, "NVML_ERROR_NOT_SUPPORTED", _NOT_SUPPORTED), 2):
                ends.readable = False
                problems.append(f"GPU {gpu.index}: cannot read its NVLink state ({exc})")
            break
        ends.to_bus[bus] = ends.to_bus.get(bus, 0) + 1
    return ends


def _nvlink_p2p(nv: Any, a: TopologyGpu, b: TopologyGpu, problems: list[str]) -> bool | None:
    fn = getattr(nv, "nvmlDeviceGetP2PStatus", None)
    if fn is None:
        return None
    try:
        status = fn(a.handle, b.handle, _code(nv, "NVML_P2P_CAPS_INDEX_NVLINK", _P2P_CAPS_INDEX_NVLINK))
    except Exception as exc:
        if getattr(exc, "value", None) != _code(nv, "NVML_ERROR_NOT_SUPPORTED", _NOT_SUPPORTED):
            problems.append(f"GPUs {a.index} and {b.index}: cannot read their NVLink peer-to-peer status ({exc})")
        return None
    return status == _code(nv, "NVML_P2P_STATUS_OK", _P2P_STATUS_OK)


def _pcie_path(nv: Any, a: TopologyGpu, b: TopologyGpu, problems: list[str]) -> str:
    fn = getattr(nv, "nvmlDeviceGetTopologyCommonAncestor", None)
    if fn is None:
        return ""
    try:
        level = int(fn(a.handle, b.handle))
    except Exception as exc:
        if getattr(exc, "value", None) != _code(nv, "NVML_ERROR_NOT_SUPPORTED", _NOT_SUPPORTED):
            problems.append(f"GPUs {a.index} and {b.index}: cannot read their common PCIe ancestor ({exc})")
        return ""
    return PATHS.get(level, f"level {level}")


def read_links(nv: Any, gpus: Sequence[TopologyGpu]) -> tuple[tuple[GpuLink, ...], tuple[str, ...]]:
    """One GpuLink per pair of `gpus` (lower index first), and a warning when some could not be read."""
    if len(gpus) < 2:
        return (), ()
    problems: list[str] = []
    ends = {g.index: _link_ends(nv, g, problems) for g in gpus}
    links = []
    unknown = 0
    ordered = sorted(gpus, key=lambda g: g.index)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            ea, eb = ends[a.index], ends[b.index]
            direct = ea.to_bus.get(_bus_key(b.bus_id), 0) or eb.to_bus.get(_bus_key(a.bus_id), 0)
            through_switch = min(ea.to_switch, eb.to_switch)
            count = direct or through_switch
            p2p = None if count else _nvlink_p2p(nv, a, b, problems)
            if count or p2p:
                links.append(GpuLink(gpus=(a.index, b.index), link="nvlink", nvlinks=count))
                continue
            path = _pcie_path(nv, a, b, problems)
            if path and (p2p is False or (ea.readable and eb.readable)):
                links.append(GpuLink(gpus=(a.index, b.index), link="pcie", path=path))
            else:
                unknown += 1
                links.append(GpuLink(gpus=(a.index, b.index), link="unknown"))
    warnings: tuple[str, ...] = ()
    if unknown:
        first = "; ".join(dict.fromkeys(problems))[:300] or "NVML reports neither NVLink nor a PCIe path"
        warnings = (f"GPU topology: {unknown} GPU pair(s) reported unknown ({first}); placement treats "
                    "them as neither NVLink nor PCIe-only",)
    return tuple(links), warnings
