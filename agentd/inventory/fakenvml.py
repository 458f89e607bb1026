"""A stand-in for the `pynvml` module, shaped like the real one.

No GPU exists on CI, yet the NVML path must be tested for the cases that
break real clusters: memory held by processes agentd does not own, a GPU that
fell off the bus, a GPU that answers some calls with errors, MIG, and NVML
that cannot start. The reader takes the NVML module as an argument, so tests,
the benchmark and `scripts/gpu-check`'s own test hand it this object instead.

It mirrors what the reader relies on in real pynvml: the function names, the
error codes and `NVMLError(code)` returning the per-code subclass, bytes
`busId` in the PCI struct, `usedGpuMemory=None` when a driver hides it, and
one call per device per fact (so call counts match the real path, which
matters for the CPU benchmark).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# Error codes, identical to pynvml's.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}

NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
nvmlMemory_v2 = 0x02000028

# Topology (NVLink and PCIe), as in pynvml.
NVML_FEATURE_ENABLED = 1
NVML_NVLINK_MAX_LINKS = 18
NVML_NVLINK_DEVICE_TYPE_GPU = 0
NVML_NVLINK_DEVICE_TYPE_SWITCH = 2
NVML_P2P_CAPS_INDEX_NVLINK = 2
NVML_P2P_STATUS_OK = 0
NVML_P2P_STATUS_NOT_SUPPORTED = 5
NVML_TOPOLOGY_MULTIPLE = 20
NVML_TOPOLOGY_NODE = 40
NVML_TOPOLOGY_SYSTEM = 50
SWITCH = "switch"  # an NVLink that ends at an NVSwitch, in FakeGpu.nvlinks


class NVMLError(Exception):
    """Like pynvml.NVMLError: `NVMLError(code)` is an instance of the code's subclass."""

    _by_code: dict[int, type[NVMLError]] = {}

    def __new__(cls, value: int):
        if cls is NVMLError:
            cls = NVMLError._by_code.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML Error with code {self.value}")


def _error_class(name: str, code: int) -> type[NVMLError]:
    def new(cls, *args):
        return NVMLError.__new__(cls, code)

    def init(self, *args):
        NVMLError.__init__(self, code)

    klass = type(name, (NVMLError,), {"__new__": new, "__init__": init})
    NVMLError._by_code[code] = klass
    return klass


NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NoPermission = _error_class("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION)
NVMLError_NotFound = _error_class("NVMLError_NotFound", NVML_ERROR_NOT_FOUND)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_FunctionNotFound = _error_class("NVMLError_FunctionNotFound", NVML_ERROR_FUNCTION_NOT_FOUND)
NVMLError_GpuIsLost = _error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_Unknown = _error_class("NVMLError_Unknown", NVML_ERROR_UNKNOWN)


@dataclass
class FakeGpu:
    """One device as NVML would describe it. `fail` maps a pynvml function name to an error code."""

    uuid: str
    name: str = "NVIDIA A100-SXM4-80GB"
    pci_bus_id: str = "00000000:00:00.0"
    memory_total: int = 80 * 1024**3
    memory_used: int = 0  # NVML v2 `used`: excludes `reserved`
    memory_reserved: int = 0
    utilization: int = 0  # percent, as NVML reports it
    compute_capability: tuple[int, int] = (8, 0)
    compute_processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, bytes)
    graphics_processes: list[tuple[int, int | None]] = field(default_factory=list)
    lost: bool = False
    fail: dict[str, int] = field(default_factory=dict)
    mig_enabled: bool = False
    mig_devices: list[FakeGpu | None] = field(default_factory=list)  # None = empty MIG slot
    supports_memory_v2: bool = True
    # Active NVLinks, one entry per link: the PCI bus id of the GPU at the other end, or SWITCH. Empty: a
    # GPU without NVLink (NVML answers NotSupported).
    nvlinks: list[str] = field(default_factory=list)
    # Where it sits on PCIe: GPUs under the same switch meet there (PXB), else at their NUMA node's root
    # complex (NODE) or across the CPU interconnect (SYS).
    pcie_switch: str = ""
    numa_node: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FakeGpu:
        d = dict(d)
        d["compute_processes"] = [tuple(p) for p in d.get("compute_processes", [])]
        d["graphics_processes"] = [tuple(p) for p in d.get("graphics_processes", [])]
        if "compute_capability" in d:
            d["compute_capability"] = tuple(d["compute_capability"])
        d["mig_devices"] = [None if m is None else cls.from_dict(m) for m in d.get("mig_devices", [])]
        return cls(**d)


@dataclass(frozen=True)
class _Handle:
    gpu: FakeGpu
    parent: FakeGpu | None = None


class FakeNvml:
    """An object with pynvml's interface over a list of FakeGpu, in NVML enumeration order.

    `init_error` makes nvmlInit fail with that code (LIBRARY_NOT_FOUND is what
    a machine without the driver gives). `calls` counts every NVML call made.
    """

    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NoPermission = NVMLError_NoPermission
    NVMLError_NotFound = NVMLError_NotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_FunctionNotFound = NVMLError_FunctionNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_Unknown = NVMLError_Unknown

    def __init__(self, gpus: list[FakeGpu] | None = None, *, init_error: int | None = None):
        self.gpus = list(gpus or [])
        self.init_error = init_error
        self.initialised = 0
        self.calls: Counter[str] = Counter()
        for name, value in globals().items():
            if name.startswith(("NVML_", "nvmlMemory_")):
                setattr(self, name, value)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> FakeNvml:
        """From JSON: {"init_error": null, "gpus": [{FakeGpu fields}, ...]}."""
        return cls([FakeGpu.from_dict(g) for g in spec.get("gpus", [])], init_error=spec.get("init_error"))

    @classmethod
    def from_file(cls, path: str | Path) -> FakeNvml:
        return cls.from_spec(json.loads(Path(path).read_text()))

    # ------------------------------------------------------------------ plumbing

    def _enter(self, fn: str, handle: _Handle | None = None) -> FakeGpu | None:
        self.calls[fn] += 1
        if fn not in ("nvmlInit", "nvmlShutdown") and not self.initialised:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        if handle is None:
            return None
        gpu = handle.gpu
        if gpu.lost or (handle.parent is not None and handle.parent.lost):
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        if fn in gpu.fail:
            raise NVMLError(gpu.fail[fn])
        return gpu

    # ------------------------------------------------------------------ library

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        if not self.initialised:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[index]
        if gpu.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        if "nvmlDeviceGetHandleByIndex" in gpu.fail:
            raise NVMLError(gpu.fail["nvmlDeviceGetHandleByIndex"])
        return _Handle(gpu)

    # ------------------------------------------------------------------ device facts

    def nvmlDeviceGetPciInfo(self, handle: _Handle) -> SimpleNamespace:
        gpu = self._enter("nvmlDeviceGetPciInfo", handle)
        bus = handle.parent.pci_bus_id if handle.parent else gpu.pci_bus_id
        domain, b, rest = bus.split(":")
        dev = rest.split(".")[0]
        return SimpleNamespace(busId=bus.encode(), domain=int(domain, 16), bus=int(b, 16), device=int(dev, 16))

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        return self._enter("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return self._enter("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version: int | None = None) -> SimpleNamespace:
        gpu = self._enter("nvmlDeviceGetMemoryInfo", handle)
        if version:
            if not gpu.supports_memory_v2:
                raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
            free = gpu.memory_total - gpu.memory_used - gpu.memory_reserved
            return SimpleNamespace(version=version, total=gpu.memory_total, reserved=gpu.memory_reserved,
                                   free=free, used=gpu.memory_used)
        # v1 counts reserved memory as used, as drivers since R510 do.
        used = gpu.memory_used + gpu.memory_reserved
        return SimpleNamespace(total=gpu.memory_total, free=gpu.memory_total - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> SimpleNamespace:
        gpu = self._enter("nvmlDeviceGetUtilizationRates", handle)
        if handle.parent is not None:  # as on real MIG devices
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=gpu.utilization, memory=0)

    def nvmlDeviceGetCudaComputeCapability(self, handle: _Handle) -> tuple[int, int]:
        return self._enter("nvmlDeviceGetCudaComputeCapability", handle).compute_capability

    def _processes(self, fn: str, handle: _Handle, attr: str) -> list[SimpleNamespace]:
        gpu = self._enter(fn, handle)
        return [SimpleNamespace(pid=pid, usedGpuMemory=mem, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
                for pid, mem in getattr(gpu, attr)]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[SimpleNamespace]:
        return self._processes("nvmlDeviceGetComputeRunningProcesses", handle, "compute_processes")

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: _Handle) -> list[SimpleNamespace]:
        return self._processes("nvmlDeviceGetGraphicsRunningProcesses", handle, "graphics_processes")

    # ------------------------------------------------------------------ MIG

    def nvmlDeviceGetMigMode(self, handle: _Handle) -> list[int]:
        gpu = self._enter("nvmlDeviceGetMigMode", handle)
        if not gpu.mig_enabled and not gpu.mig_devices:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        mode = NVML_DEVICE_MIG_ENABLE if gpu.mig_enabled else NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: _Handle) -> int:
        gpu = self._enter("nvmlDeviceGetMaxMigDeviceCount", handle)
        return max(7, len(gpu.mig_devices))

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: _Handle, index: int) -> _Handle:
        gpu = self._enter("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        if index >= len(gpu.mig_devices) or gpu.mig_devices[index] is None:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return _Handle(gpu.mig_devices[index], parent=gpu)

    # ------------------------------------------------------------------ topology

    def nvmlDeviceGetNvLinkState(self, handle: _Handle, link: int) -> int:
        gpu = self._enter("nvmlDeviceGetNvLinkState", handle)
        if not gpu.nvlinks or handle.parent is not None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= link < min(len(gpu.nvlinks), NVML_NVLINK_MAX_LINKS):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return NVML_FEATURE_ENABLED

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, handle: _Handle, link: int) -> int:
        gpu = self._enter("nvmlDeviceGetNvLinkRemoteDeviceType", handle)
        return NVML_NVLINK_DEVICE_TYPE_SWITCH if gpu.nvlinks[link] == SWITCH else NVML_NVLINK_DEVICE_TYPE_GPU

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: _Handle, link: int) -> SimpleNamespace:
        gpu = self._enter("nvmlDeviceGetNvLinkRemotePciInfo", handle)
        return SimpleNamespace(busId=gpu.nvlinks[link].encode())

    def _nvlinked(self, a: FakeGpu, b: FakeGpu) -> bool:
        return b.pci_bus_id in a.nvlinks or a.pci_bus_id in b.nvlinks or (SWITCH in a.nvlinks and SWITCH in b.nvlinks)

    def _other(self, fn: str, handle: _Handle) -> FakeGpu:
        """The second device of a pairwise call: its failures apply, the call is counted once."""
        self.calls[fn] -= 1
        gpu = self._enter(fn, handle)
        assert gpu is not None
        return gpu

    def nvmlDeviceGetP2PStatus(self, h1: _Handle, h2: _Handle, index: int) -> int:
        a = self._enter("nvmlDeviceGetP2PStatus", h1)
        b = self._other("nvmlDeviceGetP2PStatus", h2)
        if index == NVML_P2P_CAPS_INDEX_NVLINK:
            return NVML_P2P_STATUS_OK if self._nvlinked(a, b) else NVML_P2P_STATUS_NOT_SUPPORTED
        return NVML_P2P_STATUS_OK

    def nvmlDeviceGetTopologyCommonAncestor(self, h1: _Handle, h2: _Handle) -> int:
        a = self._enter("nvmlDeviceGetTopologyCommonAncestor", h1)
        b = self._other("nvmlDeviceGetTopologyCommonAncestor", h2)
        if a.pcie_switch and a.pcie_switch == b.pcie_switch:
            return NVML_TOPOLOGY_MULTIPLE
        return NVML_TOPOLOGY_NODE if a.numa_node == b.numa_node else NVML_TOPOLOGY_SYSTEM


def eight_gpu_host(*, prefix: str = "GPU-fake") -> FakeNvml:
    """An 8×A100 host with a few processes: the shape of the CPU-cost benchmark."""
    gpus = []
    for i in range(8):
        procs = [(10_000 + i, 40 * 1024**3)] if i % 2 == 0 else []
        gpus.append(FakeGpu(
            uuid=f"{prefix}-{i:04d}", pci_bus_id=f"00000000:{0x10 + i * 0x10:02X}:00.0",
            memory_used=sum(m for _, m in procs), memory_reserved=512 * 1024**2,
            utilization=37, compute_processes=procs,
        ))
    return FakeNvml(gpus)
