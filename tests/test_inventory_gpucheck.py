"""scripts/gpu-check: its comparison rules, and a full run against a fake driver (fake pynvml + fake nvidia-smi).

The real run happens on an NVIDIA host; here the same script runs the real
`agentd inventory --json` with a pynvml module that answers from a spec file,
and an nvidia-smi that answers from the same spec, so a mismatch in either
the script or the NVML path shows up as a FAIL row.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentd.types import GiB, MiB
from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu-check"


def load_script():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


gc = load_script()

SPEC = {"gpus": [
    # NVML enumerates the second bus first: agentd must still number by PCI order, as nvidia-smi does.
    {"uuid": "GPU-bbbb", "name": "NVIDIA L40S", "pci_bus_id": "00000000:AF:00.0", "memory_total": 46068 * MiB,
     "memory_used": 0, "memory_reserved": 400 * MiB, "compute_capability": [8, 9]},
    {"uuid": "GPU-aaaa", "name": "NVIDIA H100 80GB HBM3", "pci_bus_id": "00000000:18:00.0",
     "memory_total": 81559 * MiB, "memory_used": 21 * GiB, "memory_reserved": 535 * MiB,
     "compute_capability": [9, 0], "compute_processes": [[4321, 21 * GiB]]},
]}

FAKE_PYNVML = """
import os
from agentd.inventory.fakenvml import FakeNvml
_fake = FakeNvml.from_file(os.environ["FAKE_NVML_SPEC"])
def __getattr__(name):
    return getattr(_fake, name)
"""

FAKE_SMI = r"""#!PYTHON
import json, os, sys
spec = json.load(open(os.environ["FAKE_NVML_SPEC"]))
gpus = sorted(spec["gpus"], key=lambda g: g["pci_bus_id"])
skew = int(os.environ.get("FAKE_SMI_SKEW_MIB", "0"))
old = os.environ.get("FAKE_SMI_OLD") == "1"
MiB = 1 << 20
def value(i, g, f):
    return {"index": i, "uuid": g["uuid"], "name": g["name"], "pci.bus_id": g["pci_bus_id"],
            "memory.total": g["memory_total"] // MiB + (skew if i == 0 else 0),
            "memory.used": g["memory_used"] // MiB, "memory.reserved": g["memory_reserved"] // MiB,
            "compute_cap": "%d.%d" % tuple(g["compute_capability"]), "driver_version": "550.54.15"}[f]
arg = [a for a in sys.argv[1:] if a.startswith("--query-")][0]
kind, fields = arg[2:].split("=")
fields = fields.split(",")
if old and ({"memory.reserved", "compute_cap"} & set(fields)):
    print('Field "%s" is not a valid field to query.' % fields[-1]); sys.exit(2)
if kind == "query-gpu":
    for i, g in enumerate(gpus):
        print(", ".join(str(value(i, g, f)) for f in fields))
else:
    for g in gpus:
        for pid, mem in g.get("compute_processes", []):
            print("%d, %s, %d" % (pid, g["uuid"], mem // MiB))
"""


@pytest.fixture
def fake_driver(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    (tmp_path / "pylib").mkdir()
    (tmp_path / "pylib" / "pynvml.py").write_text(FAKE_PYNVML)
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(FAKE_SMI.replace("PYTHON", sys.executable))
    smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    env.update(FAKE_NVML_SPEC=str(spec), PYTHONPATH=str(tmp_path / "pylib"),
               PATH=f"{smi.parent}{os.pathsep}{env['PATH']}",
               AGENTD_SIMULATE_INVENTORY=str(ROOT / "examples/hosts/node-a.json"))  # gpu-check must ignore it
    return env


def run_check(env, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), "--no-load", "--no-bootstrap",
                           "--agentd", f"{sys.executable} -m agentd", *extra],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)


def test_a_full_run_against_a_matching_driver_passes(fake_driver):
    r = run_check(fake_driver)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RESULT: PASS" in r.stdout and "driver 550.54.15" in r.stdout
    lines = r.stdout.splitlines()
    assert any(ln.startswith("index (PCI bus order)") and "PASS" in ln for ln in lines)
    assert any(ln.startswith("memory.used MiB") and "+ 535 reserved" in ln and "PASS" in ln for ln in lines)
    assert any(ln.startswith("process 4321") and "external" in ln and "PASS" in ln for ln in lines)
    assert " FAIL" not in r.stdout


def test_a_mismatch_fails_and_old_drivers_still_work(fake_driver):
    r = run_check({**fake_driver, "FAKE_SMI_SKEW_MIB": "100", "FAKE_SMI_OLD": "1"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "RESULT: FAIL" in r.stdout
    total_rows = [ln for ln in r.stdout.splitlines() if ln.startswith("memory.total MiB")]
    assert "FAIL" in total_rows[0] and "PASS" in total_rows[1]
    assert not any(ln.startswith("compute capability") for ln in r.stdout.splitlines()), "unsupported: skipped"
    assert any(ln.startswith("name") for ln in r.stdout.splitlines()), "fields the old driver knows are checked"


def test_no_nvidia_smi_cannot_run(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--nvidia-smi", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "CANNOT RUN" in r.stdout


# ---------------------------------------------------------------------------- comparison rules


def smi_rows():
    return [{"index": 0, "uuid": "GPU-a", "memory.total": 81559, "memory.used": 1000},
            {"index": 1, "uuid": "GPU-b", "memory.total": 81559, "memory.used": 0}]


def agentd_gpu(index, uuid, used_mib, **kw):
    return {"index": index, "uuid": uuid, "memory_total": 81559 * MiB, "memory_used": used_mib * MiB,
            "utilization": 0.1, "processes": [], **kw}


def results(checks, name):
    return [c.result for c in checks if c.name == name]


def test_compare_accepts_reserved_memory_and_samples_in_between():
    inv = {"gpus": [agentd_gpu(0, "GPU-a", 1500), agentd_gpu(1, "GPU-b", 500)]}
    optional = {"GPU-a": {"memory.reserved": "500"}, "GPU-b": {"memory.reserved": "500"}}
    after = [dict(r, **{"memory.used": r["memory.used"] + 200}) for r in smi_rows()]
    checks = gc.compare(inv, smi_rows(), after, optional, [], 64)
    assert set(c.result for c in checks) == {"PASS"}
    # Without the reserved column, a value that matches plain `used` is a warning, not a pass.
    checks = gc.compare({"gpus": [agentd_gpu(0, "GPU-a", 1000), agentd_gpu(1, "GPU-b", 0)]}, smi_rows(),
                        smi_rows(), optional, [], 64)
    assert results(checks, "memory.used MiB") == ["WARN", "WARN"]
    checks = gc.compare({"gpus": [agentd_gpu(0, "GPU-a", 9000), agentd_gpu(1, "GPU-b", 500)]}, smi_rows(),
                        smi_rows(), optional, [], 64)
    assert results(checks, "memory.used MiB") == ["FAIL", "PASS"]


def test_compare_fails_on_wrong_order_missing_gpus_and_simulation():
    swapped = {"gpus": [agentd_gpu(1, "GPU-a", 1000), agentd_gpu(0, "GPU-b", 0)]}
    assert results(gc.compare(swapped, smi_rows(), smi_rows(), {}, [], 64), "index (PCI bus order)") == [
        "FAIL", "FAIL"]
    missing = {"gpus": [agentd_gpu(0, "GPU-a", 1000)], "warnings": ["GPU-b is lost"]}
    checks = gc.compare(missing, smi_rows(), smi_rows(), {}, [], 64)
    assert results(checks, "physical GPU count") == ["FAIL"]
    assert [c.note for c in checks if c.name == "uuid" and c.result == "FAIL"] == ["GPU-b is lost"]
    simulated = {"simulated": True, "gpus": [agentd_gpu(0, "GPU-a", 1000), agentd_gpu(1, "GPU-b", 0)]}
    assert results(gc.compare(simulated, smi_rows(), smi_rows(), {}, [], 64), "inventory is real hardware") == [
        "FAIL"]


def test_compare_groups_mig_instances_under_their_parent():
    inv = {"gpus": [
        agentd_gpu(0, "MIG-1", 0, mig=True, parent_uuid="GPU-a", memory_total=40000 * MiB),
        agentd_gpu(1, "MIG-2", 0, mig=True, parent_uuid="GPU-a", memory_total=40000 * MiB),
        agentd_gpu(2, "GPU-b", 0),
    ]}
    checks = gc.compare(inv, smi_rows(), smi_rows(), {}, [], 64)
    assert results(checks, "MIG instances") == ["PASS"]
    assert results(checks, "physical GPU count") == ["PASS"]
    assert results(checks, "index (PCI bus order)") == []


def test_compare_checks_processes_and_the_cuda_holder():
    proc = {"pid": 77, "memory_used": 1500 * MiB, "owned": False}
    inv = {"gpus": [agentd_gpu(0, "GPU-a", 1000, processes=[proc]), agentd_gpu(1, "GPU-b", 0)]}
    apps = [{"pid": "77", "gpu_uuid": "GPU-a", "used_memory": "1500"}]
    checks = gc.compare(inv, smi_rows(), smi_rows(), {}, apps, 64, holder=(77, 1024, None))
    assert results(checks, "process 77") == ["PASS"]
    assert results(checks, "CUDA device 0 = GPU 0 holder") == ["PASS"]
    moved = {"gpus": [agentd_gpu(0, "GPU-a", 1000), agentd_gpu(1, "GPU-b", 0, processes=[proc])]}
    checks = gc.compare(moved, smi_rows(), smi_rows(), {}, apps, 64, holder=(77, 1024, None))
    assert results(checks, "process 77") == ["FAIL"]
    assert results(checks, "CUDA device 0 = GPU 0 holder") == ["FAIL"], "CUDA's device 0 must be agentd's GPU 0"
    checks = gc.compare(inv, smi_rows(), smi_rows(), {}, None, 64, holder=(0, 1024, "cannot load libcuda.so.1"))
    assert results(checks, "CUDA device 0 = GPU 0 holder") == ["WARN"]
    assert results(checks, "compute processes") == ["SKIP"]


def test_nvidia_smi_csv_parsing_handles_na_and_bad_lines():
    rows = gc.parse_csv("0, GPU-a, [N/A]\nshort\n1, GPU-b, 9.0\n", ["index", "uuid", "compute_cap"])
    assert rows == [{"index": "0", "uuid": "GPU-a", "compute_cap": None},
                    {"index": "1", "uuid": "GPU-b", "compute_cap": "9.0"}]


def test_the_script_itself_stays_runnable_by_old_python3():
    # It runs before the venv exists, under whatever python3 the GPU host has.
    compile_src = SCRIPT.read_text()
    assert "from __future__" not in compile_src and ":=" not in compile_src
    assert Path(SCRIPT).stat().st_mode & 0o111


SMI_TOPO = ("\x1b[4m\tGPU0\tGPU1\tGPU2\tNIC0\tCPU Affinity\tNUMA Affinity\x1b[0m\n"
            "GPU0\t X \tNV18\tSYS\tPXB\t0-47\t0\n"
            "GPU1\tNV18\t X \tSYS\tSYS\t0-47\t0\n"
            "GPU2\tSYS\tSYS\t X \tSYS\t48-95\t1\n"
            "NIC0\tPXB\tSYS\tSYS\t X\n\nLegend:\n  X    = Self\n"
            "  NV#  = Connection traversing a bonded set of # NVLinks\n")


def test_topology_is_read_from_nvidia_smi_topo_and_checked_pair_by_pair(monkeypatch):
    monkeypatch.setattr(gc, "run", lambda argv, **kw: (0, SMI_TOPO, ""))
    cells = gc.smi_topology("nvidia-smi")
    assert cells[(0, 1)] == "NV18" and cells[(0, 2)] == "SYS" and cells[(2, 1)] == "SYS" and (0, 3) not in cells
    inventory = {"gpus": [{"index": i} for i in range(3)], "gpu_links": [
        {"gpus": [0, 1], "link": "nvlink", "nvlinks": 18},
        {"gpus": [0, 2], "link": "pcie", "path": "SYS"},
        {"gpus": [1, 2], "link": "unknown"}]}
    checks = gc.topology_checks(inventory, cells)
    assert [(c.gpu, c.agentd, c.smi, c.result) for c in checks] == [
        ("0-1", "NV18", "NV18", gc.PASS), ("0-2", "SYS", "SYS", gc.PASS), ("1-2", "?", "SYS", gc.WARN)]
    wrong = dict(inventory, gpu_links=[{"gpus": [0, 1], "link": "pcie", "path": "NODE"}])
    assert gc.topology_checks(wrong, cells)[0].result == gc.FAIL
    assert [c.result for c in gc.topology_checks(inventory, None)] == [gc.SKIP] * 3
    assert gc.topology_matrix(inventory).splitlines()[1].split() == ["GPU0", "X", "NV18", "SYS"]
    monkeypatch.setattr(gc, "run", lambda argv, **kw: (1, "", "not supported"))
    assert gc.smi_topology("nvidia-smi") is None
