"""GPU inventory through NVML, against the fake NVML module: normal, foreign, failing, lost, MIG, missing."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.inventory import NvmlReader, collect_inventory
from agentd.inventory import fakenvml as fk
from agentd.inventory.fakenvml import FakeGpu, FakeNvml, eight_gpu_host
from agentd.inventory.host import Ownership, PsutilProbe, StaticProbe
from agentd.inventory.nvml import pci_sort_key
from agentd.types import GiB, MiB

PROBE = StaticProbe()


def collect(nvml, **kw):
    kw.setdefault("probe", PROBE)
    return collect_inventory(node_name="gpu-node", nvml=nvml, **kw)


def test_reads_every_fact_of_a_gpu():
    nv = FakeNvml([FakeGpu(uuid="GPU-a", name="NVIDIA A100-SXM4-80GB", pci_bus_id="00000000:3B:00.0",
                           memory_total=80 * GiB, memory_used=20 * GiB, memory_reserved=512 * MiB,
                           utilization=93, compute_capability=(8, 0))])
    host = collect(nv, address="10.0.0.3:7070", labels={"rack": "a"})
    assert host.name == "gpu-node" and host.address == "10.0.0.3:7070" and host.labels == {"rack": "a"}
    assert host.cpu_count == 8 and host.memory_total == 64 * GiB and host.load_average == 0.5
    assert host.warnings == () and not host.simulated
    (g,) = host.gpus
    assert (g.index, g.uuid, g.name, g.vendor) == (0, "GPU-a", "NVIDIA A100-SXM4-80GB", "nvidia")
    assert g.memory_total == 80 * GiB
    # Reserved memory is not allocatable, so it counts as used: free is what is really free.
    assert g.memory_used == 20 * GiB + 512 * MiB
    assert g.utilization == pytest.approx(0.93)
    assert g.compute_capability == "8.0" and g.pci_bus_id == "00000000:3B:00.0"
    assert not g.mig and not g.simulated
    assert nv.initialised == 0, "a one-off collect shuts NVML down again"


def test_memory_used_by_foreign_processes_counts_and_owned_processes_are_marked():
    nv = FakeNvml([FakeGpu(uuid="GPU-a", memory_total=80 * GiB, memory_used=65 * GiB,
                           compute_processes=[(500, 40 * GiB), (701, 20 * GiB)],
                           graphics_processes=[(900, 5 * GiB)])])
    # 701 is a vLLM worker whose parent 700 agentd launched; 500 and 900 belong to someone else.
    probe = StaticProbe(parents=((701, 700), (700, 1), (500, 1), (900, 42)), names=((500, "python3"),))
    host = collect(nv, owned_pids=lambda: {700}, probe=probe)
    (g,) = host.gpus
    assert g.memory_used == 65 * GiB and g.memory_free == 15 * GiB
    procs = {p.pid: p for p in g.processes}
    assert set(procs) == {500, 701, 900}
    assert procs[500].memory_used == 40 * GiB and not procs[500].owned and procs[500].name == "python3"
    assert procs[701].owned and procs[701].memory_used == 20 * GiB
    assert not procs[900].owned and procs[900].memory_used == 5 * GiB


def test_a_process_in_both_lists_is_reported_once_and_hidden_memory_is_zero():
    nv = FakeNvml([FakeGpu(uuid="GPU-a", compute_processes=[(10, 3 * GiB), (11, None)],
                           graphics_processes=[(10, 3 * GiB)])])
    (g,) = collect(nv).gpus
    assert [(p.pid, p.memory_used) for p in g.processes] == [(10, 3 * GiB), (11, 0)]


def test_indices_follow_pci_bus_order_on_a_mixed_host():
    # NVML hands the devices out in another order; CUDA_DEVICE_ORDER=PCI_BUS_ID sorts them by bus id.
    nv = FakeNvml([
        FakeGpu(uuid="GPU-l40s", name="NVIDIA L40S", pci_bus_id="00000000:af:00.0", compute_capability=(8, 9)),
        FakeGpu(uuid="GPU-next-domain", name="NVIDIA A10", pci_bus_id="00000001:01:00.0"),
        FakeGpu(uuid="GPU-h100", name="NVIDIA H100 80GB HBM3", pci_bus_id="00000000:18:00.0",
                compute_capability=(9, 0)),
        FakeGpu(uuid="GPU-a100", name="NVIDIA A100-PCIE-40GB", pci_bus_id="00000000:3B:00.0"),
    ])
    host = collect(nv)
    assert [(g.index, g.uuid) for g in host.gpus] == [
        (0, "GPU-h100"), (1, "GPU-a100"), (2, "GPU-l40s"), (3, "GPU-next-domain")]
    assert [g.compute_capability for g in host.gpus] == ["9.0", "8.0", "8.9", "8.0"]


def test_pci_sort_key_parses_both_spellings_and_rejects_garbage():
    assert pci_sort_key("00000000:3B:00.0") == pci_sort_key("0000:3b:00.0") == (0, 0x3B, 0, 0)
    assert pci_sort_key("00000001:00:00.0") > pci_sort_key("00000000:FF:1F.7")
    assert pci_sort_key("garbage") is None


@settings(max_examples=60, deadline=None)
@given(buses=st.lists(st.integers(0, 255), min_size=1, max_size=8, unique=True), data=st.data())
def test_any_enumeration_order_gives_pci_order(buses, data):
    order = data.draw(st.permutations(buses))
    nv = FakeNvml([FakeGpu(uuid=f"GPU-{b}", pci_bus_id=f"00000000:{b:02X}:00.0") for b in order])
    assert [(g.index, g.uuid) for g in collect(nv).gpus] == [(i, f"GPU-{b}") for i, b in enumerate(sorted(buses))]


@settings(max_examples=60, deadline=None)
@given(buses=st.lists(st.integers(0, 255), min_size=1, max_size=8, unique=True), data=st.data())
def test_lost_gpus_keep_their_slot_so_other_indices_never_shift(buses, data):
    # A lost GPU gives no PCI id; real NVML enumerates in PCI order, so its NVML index is its slot.
    lost = data.draw(st.sets(st.sampled_from(buses)))
    nv = FakeNvml([FakeGpu(uuid=f"GPU-{b}", pci_bus_id=f"00000000:{b:02X}:00.0", lost=b in lost)
                   for b in sorted(buses)])
    host = collect(nv)
    expected = [(i, f"GPU-{b}") for i, b in enumerate(sorted(buses)) if b not in lost]
    assert [(g.index, g.uuid) for g in host.gpus] == expected
    assert len(host.warnings) == len(lost)


def test_a_lost_gpu_is_left_out_with_a_warning_and_later_indices_do_not_shift():
    nv = FakeNvml([
        FakeGpu(uuid="GPU-0", pci_bus_id="00000000:10:00.0"),
        FakeGpu(uuid="GPU-1", pci_bus_id="00000000:20:00.0", lost=True),
        FakeGpu(uuid="GPU-2", pci_bus_id="00000000:30:00.0"),
    ])
    host = collect(nv)
    assert [(g.index, g.uuid) for g in host.gpus] == [(0, "GPU-0"), (2, "GPU-2")]
    (w,) = host.warnings
    assert "NVML index 1" in w and "is lost" in w and "left out" in w


def test_a_gpu_lost_midway_through_reading_is_left_out():
    bad = FakeGpu(uuid="GPU-1", pci_bus_id="00000000:20:00.0",
                  fail={"nvmlDeviceGetMemoryInfo": fk.NVML_ERROR_GPU_IS_LOST})
    host = collect(FakeNvml([FakeGpu(uuid="GPU-0", pci_bus_id="00000000:10:00.0"), bad]))
    assert [g.uuid for g in host.gpus] == ["GPU-0"]
    (w,) = host.warnings
    assert "00000000:20:00.0" in w and "GPU-1" in w and "is lost" in w


def test_a_gpu_that_errors_on_an_essential_call_is_left_out():
    bad = FakeGpu(uuid="GPU-1", pci_bus_id="00000000:20:00.0",
                  fail={"nvmlDeviceGetMemoryInfo": fk.NVML_ERROR_UNKNOWN})
    host = collect(FakeNvml([bad, FakeGpu(uuid="GPU-0", pci_bus_id="00000000:10:00.0")]))
    assert [(g.index, g.uuid) for g in host.gpus] == [(0, "GPU-0")]
    (w,) = host.warnings
    assert "GPU-1" in w and "read its memory" in w and "Unknown Error" in w


def test_a_gpu_failing_an_optional_call_is_kept_with_a_warning():
    gpu = FakeGpu(uuid="GPU-0", memory_used=30 * GiB, utilization=50, compute_processes=[(5, 30 * GiB)],
                  fail={"nvmlDeviceGetUtilizationRates": fk.NVML_ERROR_UNKNOWN,
                        "nvmlDeviceGetComputeRunningProcesses": fk.NVML_ERROR_NO_PERMISSION,
                        "nvmlDeviceGetCudaComputeCapability": fk.NVML_ERROR_NOT_SUPPORTED})
    host = collect(FakeNvml([gpu]))
    (g,) = host.gpus
    assert g.utilization == 0.0 and g.processes == () and g.compute_capability == ""
    assert g.memory_used == 30 * GiB, "memory of processes we cannot list still counts as used"
    assert len(host.warnings) == 2  # NotSupported is silent
    assert any("utilization" in w for w in host.warnings)
    assert any("compute processes" in w and "Insufficient Permissions" in w for w in host.warnings)


def test_a_gpu_whose_pci_id_cannot_be_read_keeps_its_nvml_position():
    nv = FakeNvml([
        FakeGpu(uuid="GPU-0", pci_bus_id="00000000:10:00.0"),
        FakeGpu(uuid="GPU-1", fail={"nvmlDeviceGetPciInfo": fk.NVML_ERROR_UNKNOWN}),
        FakeGpu(uuid="GPU-2", pci_bus_id="00000000:30:00.0"),
    ])
    host = collect(nv)
    assert [(g.index, g.uuid, g.pci_bus_id) for g in host.gpus] == [
        (0, "GPU-0", "00000000:10:00.0"), (1, "GPU-1", ""), (2, "GPU-2", "00000000:30:00.0")]
    assert any("PCI bus id" in w for w in host.warnings)


def test_mig_instances_are_devices_with_their_parent_and_their_own_memory():
    mig = FakeGpu(uuid="GPU-mig-parent", name="NVIDIA A100-SXM4-40GB", pci_bus_id="00000000:20:00.0",
                  memory_total=40 * GiB, mig_enabled=True, mig_devices=[
                      FakeGpu(uuid="MIG-aaaa", name="NVIDIA A100-SXM4-40GB MIG 3g.20gb", memory_total=20 * GiB,
                              memory_used=5 * GiB, compute_processes=[(77, 5 * GiB)]),
                      None,  # an empty MIG slot
                      FakeGpu(uuid="MIG-bbbb", name="NVIDIA A100-SXM4-40GB MIG 2g.10gb", memory_total=10 * GiB),
                  ])
    nv = FakeNvml([FakeGpu(uuid="GPU-last", pci_bus_id="00000000:90:00.0"), mig,
                   FakeGpu(uuid="GPU-first", pci_bus_id="00000000:10:00.0")])
    host = collect(nv, owned_pids=lambda: {77})
    assert [(g.index, g.uuid, g.mig, g.parent_uuid) for g in host.gpus] == [
        (0, "GPU-first", False, ""),
        (1, "MIG-aaaa", True, "GPU-mig-parent"),
        (2, "MIG-bbbb", True, "GPU-mig-parent"),
        (3, "GPU-last", False, ""),
    ]
    a = host.gpus[1]
    assert (a.memory_total, a.memory_used, a.pci_bus_id) == (20 * GiB, 5 * GiB, "00000000:20:00.0")
    assert a.utilization == 0.0  # NotSupported on MIG devices: silent
    assert [(p.pid, p.owned) for p in a.processes] == [(77, True)]
    # Tensor parallel never spans MIG instances: their links are unknown, and that is the only warning.
    assert host.warnings == ("GPU(s) 00000000:20:00.0 have MIG enabled: their links to other GPUs are unknown",)


def test_mig_enabled_without_instances_reports_nothing_for_that_gpu_and_says_why():
    nv = FakeNvml([FakeGpu(uuid="GPU-m", pci_bus_id="00000000:20:00.0", mig_enabled=True)])
    host = collect(nv)
    assert host.gpus == ()
    (w,) = host.warnings
    assert "GPU-m" in w and "MIG enabled but no usable MIG instances" in w


@pytest.mark.parametrize(("code", "phrase"), [
    (fk.NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA driver on this host"),
    (fk.NVML_ERROR_DRIVER_NOT_LOADED, "driver not loaded"),
    (fk.NVML_ERROR_NO_PERMISSION, "no permission"),
    (fk.NVML_ERROR_UNKNOWN, "NVML failed to initialise (Unknown Error)"),
])
def test_nvml_that_cannot_start_gives_a_host_without_gpus_and_the_reason(code, phrase):
    host = collect(FakeNvml([FakeGpu(uuid="GPU-0")], init_error=code))
    assert host.gpus == () and host.cpu_count == 8
    (w,) = host.warnings
    assert phrase in w and "no GPUs reported" in w


def test_pynvml_not_installed_gives_a_host_without_gpus():
    def importer(name):
        raise ImportError(f"No module named {name!r}")

    reader = NvmlReader(importer=importer)
    host = collect(reader)
    assert host.gpus == ()
    assert host.warnings == ("pynvml (the nvidia-ml-py package) is not installed: no GPUs reported",)


def test_a_broken_binding_is_a_warning_not_a_crash():
    host = collect(object())  # no nvml functions at all
    assert host.gpus == () and "NVML failed to initialise" in host.warnings[0]

    class Exploding(FakeNvml):
        def nvmlDeviceGetCount(self):
            raise RuntimeError("binding bug")

    host = collect(Exploding([FakeGpu(uuid="GPU-0")]))
    assert host.gpus == () and "cannot count GPUs (binding bug)" in host.warnings[0]


def test_the_real_pynvml_on_this_machine_never_raises():
    host = collect_inventory(node_name="real")
    assert host.cpu_count >= 1 and host.memory_total > 0
    if not Path("/dev/nvidiactl").exists():
        assert host.gpus == ()
        assert any("NVML" in w or "NVIDIA" in w for w in host.warnings)


def test_memory_info_falls_back_to_v1_on_old_drivers():
    gpu = FakeGpu(uuid="GPU-0", memory_total=24 * GiB, memory_used=2 * GiB, memory_reserved=300 * MiB,
                  supports_memory_v2=False)
    (g,) = collect(FakeNvml([gpu])).gpus
    assert g.memory_used == 2 * GiB + 300 * MiB


def test_the_reader_keeps_nvml_initialised_and_retries_a_failed_start():
    nv = FakeNvml([FakeGpu(uuid="GPU-0")], init_error=fk.NVML_ERROR_DRIVER_NOT_LOADED)
    with NvmlReader(nv) as reader:
        assert reader.read().gpus == ()
        nv.init_error = None  # the driver got loaded
        assert [g.uuid for g in reader.read().gpus] == ["GPU-0"]
        reader.read()
        assert nv.calls["nvmlInit"] == 3 - 1  # one failed, one succeeded, then kept
        assert nv.initialised == 1
    assert nv.initialised == 0


def test_an_eight_gpu_inventory_makes_a_bounded_number_of_nvml_calls():
    nv = eight_gpu_host()
    host = collect(nv)
    assert len(host.gpus) == 8
    topology = sum(n for f, n in nv.calls.items() if "NvLink" in f or "P2P" in f or "Topology" in f)
    assert topology == 8 + 28 + 28  # NVLink state (NotSupported: no NVLink), then P2P and PCIe path per pair
    per_gpu = (sum(nv.calls.values()) - topology - nv.calls["nvmlInit"] - nv.calls["nvmlShutdown"] - 1) / 8
    assert per_gpu == 10  # handle, pci, uuid, mig mode, memory, name, utilization, cc, 2 process lists


def test_owned_pids_failing_is_a_warning():
    def broken():
        raise OSError("state dir unreadable")

    host = collect(FakeNvml([FakeGpu(uuid="GPU-0", compute_processes=[(5, GiB)])]), owned_pids=broken)
    assert [p.owned for p in host.gpus[0].processes] == [False]
    assert any("state dir unreadable" in w for w in host.warnings)


def test_ownership_follows_real_descendants_of_an_owned_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        is_owned = Ownership({os.getpid()}, PsutilProbe().parent_pid)
        assert is_owned(child.pid)
        assert is_owned(os.getpid())
        assert not Ownership({child.pid}, PsutilProbe().parent_pid)(os.getpid())
        assert not is_owned(999_999_999)  # no such process
    finally:
        child.kill()
        child.wait()


def test_ownership_stops_on_a_parent_cycle():
    is_owned = Ownership({1234}, {10: 11, 11: 10}.get)
    assert not is_owned(10)


def test_close_does_not_hang_behind_a_read_stuck_in_the_driver():
    release, entered = threading.Event(), threading.Event()

    class Stuck(FakeNvml):
        def nvmlDeviceGetCount(self):
            entered.set()
            release.wait(10)
            return 0

    nv = Stuck([])
    reader = NvmlReader(nv)
    worker = threading.Thread(target=reader.read)
    worker.start()
    assert entered.wait(10)
    reader.close(timeout=0.01)
    assert nv.calls["nvmlShutdown"] == 0, "no shutdown under a running read"
    release.set()
    worker.join(10)
    reader.close()
    assert nv.calls["nvmlShutdown"] == 1 and nv.initialised == 0
