"""NVIDIA GPUs through NVML, with every failure turned into fewer GPUs and a warning.

The NVML module is injected (real `pynvml` by default), so the degraded
paths are tested with agentd.inventory.fakenvml on machines without a GPU.

Decisions that matter to placement:

- **Indices follow PCI bus order** (what CUDA uses with
  `CUDA_DEVICE_ORDER=PCI_BUS_ID`, and what nvidia-smi shows), so the index
  placement picks is the GPU the runtime gets, also on hosts with mixed models.
  A GPU that is lost or failing keeps its slot: the indices of the GPUs after
  it do not shift, so existing assignments keep naming the same hardware.
- **memory_used = total - free**, i.e. it includes the driver's reserved
  memory. nvidia-smi (R510+) leaves reserved memory out of "used", but it is
  not allocatable either, and placement needs what is really free.
- **MIG**: a GPU with MIG on is not usable whole. Its MIG instances are
  reported as devices (mig=True, parent_uuid), each with its own slot.
- NVML stays initialised between reads: nvmlInit can take seconds on a GPU
  without persistence mode, far too slow to repeat every refresh.
- **Topology** (which pairs are joined by NVLink, which only by PCIe;
  topology.py) is read once per set of GPUs and kept while the same GPUs are
  present: it takes a few hundred NVML calls and does not change at runtime.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentd.inventory.topology import TopologyGpu, read_links
from agentd.logs import fields
from agentd.types import GpuInfo, GpuLink, GpuProcess

log = logging.getLogger("agentd.inventory")

# Error codes from the NVML headers, used when the module lacks the constant.
_LIBRARY_NOT_FOUND = 12
_DRIVER_NOT_LOADED = 9
_NOT_SUPPORTED = 3
_NOT_FOUND = 6
_NO_PERMISSION = 4
_UNINITIALIZED = 1
_GPU_IS_LOST = 15
_MIG_ENABLE = 1


@dataclass(frozen=True)
class GpuReading:
    gpus: tuple[GpuInfo, ...] = ()
    warnings: tuple[str, ...] = ()
    links: tuple[GpuLink, ...] = ()  # GPU pairs and their interconnect (topology.py)


class _DeviceFailed(Exception):
    """A device cannot be reported at all (lost, or an essential call failed)."""

    def __init__(self, sentence: str):
        super().__init__(sentence)
        self.sentence = sentence


@dataclass
class _Slot:
    """One physical GPU in NVML order, with the devices it contributes (or none when it failed)."""

    nvml_index: int
    pci_key: tuple[int, int, int, int] | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)
    handle: Any = None
    bus_id: str = ""


def pci_sort_key(bus_id: str) -> tuple[int, int, int, int] | None:
    """(domain, bus, device, function) from "00000000:3B:00.0" or "0000:3b:00.0"; None if malformed."""
    try:
        domain, bus, rest = bus_id.strip().split(":")
        device, function = rest.split(".")
        return int(domain, 16), int(bus, 16), int(device, 16), int(function, 16)
    except ValueError:
        return None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes | bytearray) else str(value)


class NvmlReader:
    """Reads NVIDIA GPUs through an NVML module; one instance lives as long as the daemon.

    Thread-safe: the refresher reads from a worker thread while a CLI-style
    one-off read may happen elsewhere; reads are serialised by a lock.
    """

    def __init__(self, nvml: Any | None = None, *, importer: Callable[[str], Any] = importlib.import_module):
        self._nvml = nvml
        self._importer = importer
        self._initialised = False
        self._lock = threading.Lock()
        # The topology of the last set of whole GPUs read: (their (uuid, bus id, index)s, links, warnings).
        self._topology: tuple[tuple, tuple[GpuLink, ...], tuple[str, ...]] | None = None

    # ------------------------------------------------------------------ lifecycle

    def _module(self) -> tuple[Any | None, str | None]:
        if self._nvml is None:
            try:
                self._nvml = self._importer("pynvml")
            except ImportError:
                return None, "pynvml (the nvidia-ml-py package) is not installed: no GPUs reported"
        return self._nvml, None

    def _code(self, nv: Any, name: str, default: int) -> int:
        return getattr(nv, name, default)

    def _error_code(self, exc: BaseException) -> int | None:
        return getattr(exc, "value", None)

    def _init(self, nv: Any) -> str | None:
        if self._initialised:
            return None
        try:
            nv.nvmlInit()
        except Exception as exc:  # NVMLError, or OSError from a broken driver install
            code = self._error_code(exc)
            if code == self._code(nv, "NVML_ERROR_LIBRARY_NOT_FOUND", _LIBRARY_NOT_FOUND):
                return ("NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on this host, "
                        "no GPUs reported")
            if code == self._code(nv, "NVML_ERROR_DRIVER_NOT_LOADED", _DRIVER_NOT_LOADED):
                return "NVIDIA driver not loaded (NVML: Driver Not Loaded): no GPUs reported"
            if code == self._code(nv, "NVML_ERROR_NO_PERMISSION", _NO_PERMISSION):
                return "no permission to use NVML (Insufficient Permissions): no GPUs reported"
            return f"NVML failed to initialise ({exc or type(exc).__name__}): no GPUs reported"
        self._initialised = True
        return None

    def close(self, timeout: float = 1.0) -> None:
        """Shuts NVML down, unless a read is stuck in the driver: then process exit cleans up."""
        if not self._lock.acquire(timeout=timeout):
            log.warning("NVML read still running at close; not shutting NVML down")
            return
        try:
            if self._initialised and self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except Exception as exc:
                    log.debug("NVML shutdown failed", extra=fields(error=str(exc)))
            self._initialised = False
        finally:
            self._lock.release()

    def __enter__(self) -> NvmlReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading

    def read(self, *, is_owned: Callable[[int], bool] = lambda pid: False,
             process_name: Callable[[int], str] = lambda pid: "") -> GpuReading:
        """All readable GPUs in PCI order, and a warning for each that could not be read."""
        with self._lock:
            nv, missing = self._module()
            if nv is None:
                return GpuReading(warnings=(missing or "",))
            failure = self._init(nv)
            if failure:
                return GpuReading(warnings=(failure,))
            try:
                count = int(nv.nvmlDeviceGetCount())
            except Exception as exc:
                self._reset_if_uninitialised(nv, exc)
                return GpuReading(warnings=(f"NVML cannot count GPUs ({exc}): no GPUs reported",))
            warnings: list[str] = []
            slots = [self._read_slot(nv, i, is_owned, process_name, warnings) for i in range(count)]
            ordered = _pci_order(slots)
            gpus = _number(ordered)
            links, topology_warnings = self._links(nv, ordered, gpus)
            return GpuReading(gpus=tuple(gpus), warnings=(*warnings, *topology_warnings), links=links)

    def _links(self, nv: Any, ordered: list[_Slot], gpus: list[GpuInfo]) -> tuple[tuple[GpuLink, ...],
                                                                                    tuple[str, ...]]:
        """The links between whole GPUs, read again only when the set of GPUs changed."""
        whole: list[TopologyGpu] = []
        mig: list[str] = []
        index = 0
        for slot in ordered:
            if not slot.devices:
                index += 1
                continue
            if len(slot.devices) == 1 and not slot.devices[0]["mig"]:
                whole.append(TopologyGpu(index, slot.handle, slot.bus_id))
            else:
                mig.append(slot.bus_id or f"at NVML index {slot.nvml_index}")
            index += len(slot.devices)
        key = tuple((g.index, g.bus_id) for g in whole) + tuple(gpu.uuid for gpu in gpus)
        if self._topology is None or self._topology[0] != key:
            try:
                links, warnings = read_links(nv, whole)
            except Exception as exc:  # a binding surprise must not cost the host its GPUs
                log.warning("GPU topology failed", extra=fields(error=str(exc)))
                links, warnings = (), (f"GPU topology could not be read ({type(exc).__name__}: {exc}): "
                                       "every GPU pair is unknown",)
            self._topology = (key, links, warnings)
        links, warnings = self._topology[1], self._topology[2]
        if mig and len(gpus) > 1:
            warnings = (*warnings, f"GPU(s) {', '.join(mig)} have MIG enabled: their links to other GPUs "
                                   "are unknown")
        return links, warnings

    def _reset_if_uninitialised(self, nv: Any, exc: BaseException) -> None:
        if self._error_code(exc) == self._code(nv, "NVML_ERROR_UNINITIALIZED", _UNINITIALIZED):
            self._initialised = False

    def _read_slot(self, nv: Any, i: int, is_owned: Callable[[int], bool],
                   process_name: Callable[[int], str], warnings: list[str]) -> _Slot:
        slot = _Slot(nvml_index=i)
        label = f"GPU at NVML index {i}"
        try:
            handle = self._essential(nv, label, "get a handle", nv.nvmlDeviceGetHandleByIndex, i)
            slot.handle = handle
            bus_id = ""
            try:
                pci = nv.nvmlDeviceGetPciInfo(handle)
                bus_id = slot.bus_id = _text(pci.busId)
                slot.pci_key = pci_sort_key(bus_id)
                label = f"GPU {bus_id}"
            except Exception as exc:
                self._raise_if_lost(nv, exc, label)
                warnings.append(f"{label}: cannot read its PCI bus id ({exc}); ordered by NVML index")
            uuid = _text(self._essential(nv, label, "read its UUID", nv.nvmlDeviceGetUUID, handle))
            label = f"GPU {bus_id or i} ({uuid})"
            if self._mig_enabled(nv, handle, label):
                slot.devices = self._read_mig(nv, handle, uuid, bus_id, label, is_owned, process_name, warnings)
            else:
                slot.devices = [self._device(nv, handle, uuid, label, bus_id, is_owned, process_name, warnings)]
        except _DeviceFailed as failed:
            warnings.append(failed.sentence)
            slot.devices = []
        return slot

    def _raise_if_lost(self, nv: Any, exc: BaseException, label: str) -> None:
        if self._error_code(exc) == self._code(nv, "NVML_ERROR_GPU_IS_LOST", _GPU_IS_LOST):
            raise _DeviceFailed(f"{label} is lost (NVML: {exc}): left out until it is reset or the host rebooted")

    def _essential(self, nv: Any, label: str, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            self._raise_if_lost(nv, exc, label)
            raise _DeviceFailed(f"{label} returned an error when asked to {what} ({exc}): left out") from None

    def _optional(self, nv: Any, label: str, what: str, warnings: list[str], default: Any,
                  fn: Callable[..., Any], *args: Any) -> Any:
        """A fact placement can live without: NotSupported is silent, other errors warn."""
        try:
            return fn(*args)
        except Exception as exc:
            self._raise_if_lost(nv, exc, label)
            if self._error_code(exc) != self._code(nv, "NVML_ERROR_NOT_SUPPORTED", _NOT_SUPPORTED):
                warnings.append(f"{label}: cannot read its {what} ({exc})")
            return default

    def _mig_enabled(self, nv: Any, handle: Any, label: str) -> bool:
        fn = getattr(nv, "nvmlDeviceGetMigMode", None)
        if fn is None:
            return False
        try:
            current, _pending = fn(handle)
        except Exception as exc:
            self._raise_if_lost(nv, exc, label)
            return False  # NotSupported on GPUs without MIG; any other error: treat as off
        return current == self._code(nv, "NVML_DEVICE_MIG_ENABLE", _MIG_ENABLE)

    def _memory(self, nv: Any, handle: Any, label: str) -> tuple[int, int]:
        """(total, used) where used = total - free, reserved memory included."""
        version = getattr(nv, "nvmlMemory_v2", None)
        info = None
        if version is not None:
            try:
                info = nv.nvmlDeviceGetMemoryInfo(handle, version=version)
            except Exception as exc:
                self._raise_if_lost(nv, exc, label)  # older drivers lack v2: fall back to v1
        if info is None:
            info = self._essential(nv, label, "read its memory", nv.nvmlDeviceGetMemoryInfo, handle)
        total, free = int(info.total), int(info.free)
        return total, min(total, max(0, total - free))

    def _processes(self, nv: Any, handle: Any, label: str, is_owned: Callable[[int], bool],
                   process_name: Callable[[int], str], warnings: list[str]) -> tuple[GpuProcess, ...]:
        memory: dict[int, int] = {}
        for fn_name, kind in (("nvmlDeviceGetComputeRunningProcesses", "compute processes"),
                              ("nvmlDeviceGetGraphicsRunningProcesses", "graphics processes")):
            fn = getattr(nv, fn_name, None)
            if fn is None:
                continue
            for proc in self._process_list(nv, fn_name, fn, handle, label, kind, warnings):
                used = proc.usedGpuMemory or 0  # None when the driver hides it (e.g. WDDM)
                memory[int(proc.pid)] = max(memory.get(int(proc.pid), 0), int(used))
        return tuple(GpuProcess(pid=pid, memory_used=mem, name=process_name(pid), owned=is_owned(pid))
                     for pid, mem in sorted(memory.items()))

    def _process_list(self, nv: Any, fn_name: str, fn: Callable[..., Any], handle: Any, label: str, kind: str,
                      warnings: list[str]) -> list[Any]:
        try:
            return list(fn(handle))
        except Exception as exc:
            self._raise_if_lost(nv, exc, label)
            # pynvml's unversioned call raises NVMLLibraryMismatchError on drivers without _v3.
            older = getattr(nv, fn_name + "_v2", None)
            if older is not None and type(exc).__name__ == "NVMLLibraryMismatchError":
                return self._optional(nv, label, kind, warnings, [], older, handle)
            if self._error_code(exc) != self._code(nv, "NVML_ERROR_NOT_SUPPORTED", _NOT_SUPPORTED):
                warnings.append(f"{label}: cannot list its {kind} ({exc}); their memory still counts as used")
            return []

    def _device(self, nv: Any, handle: Any, uuid: str, label: str, bus_id: str, is_owned: Callable[[int], bool],
                process_name: Callable[[int], str], warnings: list[str], *, cc_default: str = "",
                parent_uuid: str = "") -> dict[str, Any]:
        total, used = self._memory(nv, handle, label)
        name = _text(self._optional(nv, label, "name", warnings, "", nv.nvmlDeviceGetName, handle))
        rates = self._optional(nv, label, "utilization", warnings, None, nv.nvmlDeviceGetUtilizationRates, handle)
        cc = self._optional(nv, label, "compute capability", warnings, None,
                            nv.nvmlDeviceGetCudaComputeCapability, handle)
        utilization = min(1.0, max(0.0, rates.gpu / 100.0)) if rates is not None else 0.0
        return {
            "uuid": uuid, "name": name, "vendor": "nvidia", "memory_total": total, "memory_used": used,
            "utilization": utilization, "compute_capability": f"{cc[0]}.{cc[1]}" if cc else cc_default,
            "pci_bus_id": bus_id,
            "processes": self._processes(nv, handle, label, is_owned, process_name, warnings),
            "mig": bool(parent_uuid), "parent_uuid": parent_uuid,
        }

    def _read_mig(self, nv: Any, handle: Any, uuid: str, bus_id: str, label: str, is_owned: Callable[[int], bool],
                  process_name: Callable[[int], str], warnings: list[str]) -> list[dict[str, Any]]:
        cc = self._optional(nv, label, "compute capability", warnings, None,
                            nv.nvmlDeviceGetCudaComputeCapability, handle)
        cc_text = f"{cc[0]}.{cc[1]}" if cc else ""
        slots = int(self._optional(nv, label, "MIG device count", warnings, 0,
                                   nv.nvmlDeviceGetMaxMigDeviceCount, handle))
        devices = []
        for k in range(slots):
            mig_label = f"{label} MIG slot {k}"
            try:
                mig = nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, k)
            except Exception as exc:
                self._raise_if_lost(nv, exc, label)
                if self._error_code(exc) != self._code(nv, "NVML_ERROR_NOT_FOUND", _NOT_FOUND):
                    warnings.append(f"{mig_label}: cannot open it ({exc}): left out")
                continue
            try:
                mig_uuid = _text(self._essential(nv, mig_label, "read its UUID", nv.nvmlDeviceGetUUID, mig))
                mig_label = f"{label} MIG device {mig_uuid}"
                devices.append(self._device(nv, mig, mig_uuid, mig_label, bus_id, is_owned, process_name, warnings,
                                            cc_default=cc_text, parent_uuid=uuid))
            except _DeviceFailed as failed:
                warnings.append(failed.sentence)
        if not devices:
            warnings.append(f"{label} has MIG enabled but no usable MIG instances: no devices reported for it")
        return devices


def _pci_order(slots: list[_Slot]) -> list[_Slot]:
    """Slots sorted by PCI bus id; a slot without one keeps its NVML position (NVML lists in PCI order)."""
    known = sorted((s for s in slots if s.pci_key is not None), key=lambda s: s.pci_key)
    ordered = list(known)
    for s in sorted((s for s in slots if s.pci_key is None), key=lambda s: s.nvml_index):
        ordered.insert(min(s.nvml_index, len(ordered)), s)
    return ordered


def _number(slots: list[_Slot]) -> list[GpuInfo]:
    """Index = position in PCI order; a failed GPU keeps its slot so later indices stay stable."""
    gpus: list[GpuInfo] = []
    index = 0
    for slot in slots:
        if not slot.devices:
            index += 1
            continue
        for device in slot.devices:
            gpus.append(GpuInfo(index=index, **device))
            index += 1
    return gpus
