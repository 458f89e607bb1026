"""GPU topology through NVML (which GPU pairs share NVLink, which only PCIe), against the fake NVML module.

Placement's vLLM policy reads these links (docs/placement.md), so every
degraded path must end in "unknown" with a warning, never in a crash or in
a guess that a pair is NVLink-connected.
"""

from __future__ import annotations

import json
from pathlib import Path

from agentd.inventory import NvmlReader, collect_inventory
from agentd.inventory import fakenvml as fk
from agentd.inventory.change import material_changes
from agentd.inventory.fakenvml import SWITCH, FakeGpu, FakeNvml
from agentd.inventory.host import StaticProbe
from agentd.types import HostInventory

ROOT = Path(__file__).resolve().parent.parent
PROBE = StaticProbe()


def bus(i: int) -> str:
    return f"00000000:{0x18 + i * 0x10:02X}:00.0"


def gpus(n: int, **per) -> list[FakeGpu]:
    return [FakeGpu(uuid=f"GPU-{i}", pci_bus_id=bus(i), **{k: v(i) for k, v in per.items()}) for i in range(n)]


def by_pair(links) -> dict[tuple[int, int], tuple[str, int, str]]:
    return {link.gpus: (link.link, link.nvlinks, link.path) for link in links}


def test_nvswitch_host_links_every_pair_with_its_link_count():
    r = NvmlReader(FakeNvml(gpus(4, nvlinks=lambda i: [SWITCH] * 18))).read()
    assert by_pair(r.links) == {(a, b): ("nvlink", 18, "") for a in range(4) for b in range(a + 1, 4)}
    assert r.warnings == ()


def test_bridged_pairs_are_nvlink_and_the_rest_pcie_with_the_path():
    """GPUs 0-1 and 2-3 bridged (4 links); 0-1 under one PCIe switch, 2-3 under another on the other socket."""
    nv = FakeNvml(gpus(4, nvlinks=lambda i: [bus(i ^ 1)] * 4, pcie_switch=lambda i: f"sw{i // 2}",
                       numa_node=lambda i: i // 2))
    r = NvmlReader(nv).read()
    assert by_pair(r.links) == {
        (0, 1): ("nvlink", 4, ""), (2, 3): ("nvlink", 4, ""),
        (0, 2): ("pcie", 0, "SYS"), (0, 3): ("pcie", 0, "SYS"), (1, 2): ("pcie", 0, "SYS"), (1, 3): ("pcie", 0, "SYS"),
    }
    assert r.warnings == ()


def test_pcie_only_gpus_are_pcie_with_the_common_ancestor():
    nv = FakeNvml(gpus(4, pcie_switch=lambda i: f"sw{i // 2}", numa_node=lambda i: 0))
    r = NvmlReader(nv).read()
    assert by_pair(r.links) == {(0, 1): ("pcie", 0, "PXB"), (2, 3): ("pcie", 0, "PXB"), (0, 2): ("pcie", 0, "NODE"),
                                (0, 3): ("pcie", 0, "NODE"), (1, 2): ("pcie", 0, "NODE"), (1, 3): ("pcie", 0, "NODE")}
    assert r.warnings == ()


def test_a_failing_query_gives_unknown_and_one_warning_never_a_crash():
    g = gpus(3)
    g[1].fail = {"nvmlDeviceGetNvLinkState": fk.NVML_ERROR_UNKNOWN,
                 "nvmlDeviceGetTopologyCommonAncestor": fk.NVML_ERROR_UNKNOWN,
                 "nvmlDeviceGetP2PStatus": fk.NVML_ERROR_UNKNOWN}
    r = NvmlReader(FakeNvml(g)).read()
    assert len(r.gpus) == 3
    links = by_pair(r.links)
    assert links[(0, 1)] == links[(1, 2)] == ("unknown", 0, "")
    assert links[(0, 2)][0] == "pcie"
    (w,) = r.warnings
    assert w.startswith("GPU topology: 2 GPU pair(s) reported unknown (GPU 1: cannot read its NVLink state")
    assert "placement treats them as neither NVLink nor PCIe-only" in w


def test_an_nvml_without_topology_calls_reports_unknown():
    class Old:
        """A pynvml from before the topology calls."""

        def __init__(self, nv):
            self._nv = nv

        def __getattr__(self, name):
            if "NvLink" in name or "P2P" in name or "Topology" in name:
                raise AttributeError(name)
            return getattr(self._nv, name)

    r = NvmlReader(Old(FakeNvml(gpus(2)))).read()
    assert [link.link for link in r.links] == ["unknown"] and "1 GPU pair(s) reported unknown" in r.warnings[0]


def test_mig_gpus_get_no_links_and_a_warning():
    g = gpus(3, nvlinks=lambda i: [SWITCH] * 12)
    g[2].mig_enabled = True
    g[2].mig_devices = [FakeGpu(uuid="MIG-a", memory_total=10 * 2**30)]
    r = NvmlReader(FakeNvml(g)).read()
    assert [x.uuid for x in r.gpus] == ["GPU-0", "GPU-1", "MIG-a"]
    assert by_pair(r.links) == {(0, 1): ("nvlink", 12, "")}
    assert any("have MIG enabled: their links to other GPUs are unknown" in w for w in r.warnings)


def test_a_lost_gpu_keeps_its_slot_and_the_others_keep_their_links():
    g = gpus(3, nvlinks=lambda i: [SWITCH] * 18)
    g[1].lost = True
    r = NvmlReader(FakeNvml(g)).read()
    assert [x.index for x in r.gpus] == [0, 2]
    assert by_pair(r.links) == {(0, 2): ("nvlink", 18, "")}


def test_one_gpu_has_no_pairs():
    r = NvmlReader(FakeNvml(gpus(1))).read()
    assert r.links == () and r.warnings == ()


def test_topology_is_read_once_per_set_of_gpus():
    nv = FakeNvml(gpus(4, nvlinks=lambda i: [SWITCH] * 18))
    reader = NvmlReader(nv)
    first = reader.read().links
    calls = sum(n for f, n in nv.calls.items() if "NvLink" in f or "P2P" in f or "Topology" in f)
    assert calls > 0
    assert reader.read().links == first
    assert sum(n for f, n in nv.calls.items() if "NvLink" in f or "P2P" in f or "Topology" in f) == calls
    nv.gpus.pop()  # a GPU left: read again
    assert len(reader.read().links) == 3


def test_the_inventory_carries_the_links_and_leaves_them_out_when_there_are_none():
    host = collect_inventory(node_name="n", nvml=FakeNvml(gpus(2, nvlinks=lambda i: [SWITCH] * 18)), probe=PROBE)
    data = json.loads(host.model_dump_json())
    assert data["gpu_links"] == [{"gpus": [0, 1], "link": "nvlink", "nvlinks": 18}]
    assert HostInventory.model_validate(data) == host
    bare = collect_inventory(node_name="n", nvml=FakeNvml(gpus(1)), probe=PROBE)
    assert "gpu_links" not in json.loads(bare.model_dump_json())
    changes = material_changes(bare.model_copy(update={"gpus": host.gpus}), host)
    assert changes == ["GPU topology changed (0 -> 1 GPU pair(s) reported)"]


def test_simulated_hosts_carry_their_topology():
    for name, kind in (("8xh100.json", "nvlink"), ("8xl40s.json", "pcie"), ("8xa100.json", "nvlink")):
        host = collect_inventory(node_name="x", simulate=ROOT / "examples/hosts" / name, probe=PROBE)
        assert len(host.gpu_links) == 28 and {link.link for link in host.gpu_links} == {kind}


def test_agentd_inventory_shows_the_links_as_nvidia_smi_does():
    from agentd.cli.inventory import render

    host = collect_inventory(node_name="x", simulate=ROOT / "examples/hosts/8xh100.json", probe=PROBE)
    lines = render(host).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("links "))
    assert lines[start].split() == ["links", *(f"GPU{i}" for i in range(8))]
    assert lines[start + 1].split() == ["GPU0", "X", *["NV18"] * 7]
    unknown = host.model_copy(update={"gpu_links": host.gpu_links[:1]})
    assert render(unknown).splitlines()[start + 1].split() == ["GPU0", "X", "NV18"]
    assert "links" not in render(host.model_copy(update={"gpu_links": ()}))
