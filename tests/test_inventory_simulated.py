"""Simulated host inventories: validation with the file and field named, labelling, names, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentd.config import Settings
from agentd.errors import InvalidInput
from agentd.inventory import Collector, collect_inventory
from agentd.inventory.host import HostFacts, StaticProbe
from agentd.types import GiB, HostInventory
from tests.conftest import ROOT, run_cli

EXAMPLES = sorted((ROOT / "examples" / "hosts").glob("*.json"))
PROBE = StaticProbe(host=HostFacts(cpu_count=4, memory_total=16 * GiB, memory_available=8 * GiB, load_average=1.5))


def write(tmp_path: Path, data, name="host.json") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def gpu(index=0, **kw):
    return {"index": index, "uuid": f"GPU-{index}", "memory_total": 24 * GiB, "memory_used": 0, **kw}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_host_loads_and_is_labelled_simulated(path):
    host = collect_inventory(node_name="ignored", simulate=path, probe=PROBE)
    raw = json.loads(path.read_text())
    assert host.name == raw["name"]
    assert host.simulated and host.gpus and all(g.simulated for g in host.gpus)
    assert [g.index for g in host.gpus] == sorted(g.index for g in host.gpus)


def test_examples_cover_what_the_demo_and_tests_need():
    names = {p.name for p in EXAMPLES}
    assert {"8xa100.json", "node-a.json", "node-b.json"} <= names
    a = collect_inventory(node_name="x", simulate=ROOT / "examples/hosts/node-a.json", probe=PROBE)
    assert [g.memory_total for g in a.gpus] == [24 * GiB, 24 * GiB]
    assert len(collect_inventory(node_name="x", simulate=ROOT / "examples/hosts/8xa100.json", probe=PROBE).gpus) == 8


def test_name_comes_from_the_file_unless_the_caller_overrides_it(tmp_path):
    f = write(tmp_path, {"name": "from-file", "address": "10.0.0.9:7070", "labels": {"rack": "a"},
                         "gpus": [gpu()]})
    shown = collect_inventory(node_name="node-1", simulate=f, probe=PROBE)
    assert (shown.name, shown.address, shown.labels) == ("from-file", "10.0.0.9:7070", {"rack": "a"})
    daemon = collect_inventory(node_name="node-1", address="127.0.0.1:7071", labels={"zone": "b"},
                               simulate=f, override_name=True, probe=PROBE)
    assert (daemon.name, daemon.address, daemon.labels) == ("node-1", "127.0.0.1:7071", {"rack": "a", "zone": "b"})


def test_a_file_without_name_or_host_facts_takes_them_from_the_agent(tmp_path):
    f = write(tmp_path, {"gpus": [gpu(1), gpu(0)], "memory_total": 512 * GiB})
    host = collect_inventory(node_name="node-7", simulate=f, probe=PROBE)
    assert host.name == "node-7"
    assert host.memory_total == 512 * GiB, "declared facts win"
    assert (host.cpu_count, host.memory_available, host.load_average) == (4, 8 * GiB, 1.5)
    assert [g.index for g in host.gpus] == [0, 1]


def test_simulated_processes_of_agentd_are_marked_owned(tmp_path):
    f = write(tmp_path, {"name": "n", "gpus": [gpu(memory_used=4 * GiB, processes=[
        {"pid": 4001, "memory_used": 2 * GiB}, {"pid": 4002, "memory_used": 2 * GiB}])]})
    host = collect_inventory(node_name="n", simulate=f, owned_pids=lambda: {4001}, probe=PROBE)
    assert [(p.pid, p.owned) for p in host.gpus[0].processes] == [(4001, True), (4002, False)]


def test_the_file_is_read_again_at_each_collect(tmp_path):
    f = write(tmp_path, {"name": "n", "gpus": [gpu()]})
    collector = Collector(node_name="n", simulate=f, probe=PROBE)
    assert collector().gpus[0].memory_used == 0
    write(tmp_path, {"name": "n", "gpus": [gpu(memory_used=10 * GiB)]})
    assert collector().gpus[0].memory_used == 10 * GiB
    collector.close()


@pytest.mark.parametrize(("content", "fragment"), [
    ("{not json", ":1:2: not valid JSON"),
    ("[]", "expected a JSON object (one host inventory), got list"),
    ({"hosts": [{"name": "a"}]}, "this is a cluster file"),
    ({"name": "n", "gpus": [gpu(memory_total=-1)]}, "field gpus[0].memory_total: Input should be greater than"),
    ({"name": "n", "gpus": [gpu(), {"index": 1}]}, "field gpus[1].uuid: Field required"),
    ({"name": "n", "gpus": [gpu(colour="red")]}, "field gpus[0].colour: Extra inputs are not permitted"),
    ({"name": "n", "gpus": [gpu(0), gpu(0)]}, "field gpus: duplicate GPU index 0"),
    ({"name": "n", "cpu_count": "many"}, "field cpu_count:"),
])
def test_an_invalid_file_names_the_file_and_the_field(tmp_path, content, fragment):
    f = write(tmp_path, content)
    with pytest.raises(InvalidInput) as err:
        collect_inventory(node_name="n", simulate=f, probe=PROBE)
    assert str(f) in str(err.value)
    assert fragment in str(err.value)


def test_a_missing_file_is_invalid_input(tmp_path):
    with pytest.raises(InvalidInput, match="does not exist"):
        collect_inventory(node_name="n", simulate=tmp_path / "nope.json", probe=PROBE)


def test_collector_from_settings_reports_the_agents_name_and_address():
    settings = Settings(node_name="agent-2", listen="127.0.0.1:7072", labels={"zone": "z"},
                        simulate_inventory=ROOT / "examples/hosts/node-a.json")
    host = Collector.from_settings(settings, owned_pids=set)()
    assert (host.name, host.address, host.simulated) == ("agent-2", "127.0.0.1:7072", True)
    assert host.labels == {"zone": "z"}


# ---------------------------------------------------------------------------- CLI (real subprocesses)


def test_cli_json_is_a_host_inventory_that_round_trips_as_a_simulate_file(tmp_path):
    r = run_cli("inventory", "--json", "--simulate", "examples/hosts/node-b.json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    host = HostInventory.model_validate(data)
    assert host.name == "node-b" and host.simulated and all(g.simulated for g in host.gpus)
    assert host.gpus[1].processes[0].pid == 4242 and not host.gpus[1].processes[0].owned
    again = run_cli("inventory", "--json", "--simulate", str(write(tmp_path, r.stdout)))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == data

    human = run_cli("inventory", "--simulate", "examples/hosts/node-b.json")
    assert human.returncode == 0
    assert "host node-b (SIMULATED)" in human.stdout
    assert "pid 4242" in human.stdout and "external" in human.stdout
    assert human.stdout.count("[SIMULATED]") == 2


def test_cli_reports_a_bad_file_in_one_line_with_exit_2(tmp_path):
    f = write(tmp_path, {"name": "n", "gpus": [gpu(memory_total=-5)]})
    r = run_cli("inventory", "--simulate", str(f))
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and str(f) in r.stderr and "gpus[0].memory_total" in r.stderr


def test_cli_without_simulate_uses_the_daemons_setting_and_node_name():
    r = run_cli("inventory", "--json", env={"AGENTD_SIMULATE_INVENTORY": "examples/hosts/node-a.json",
                                             "AGENTD_NODE_NAME": "agent-a", "AGENTD_LISTEN": "127.0.0.1:7171"})
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert (data["name"], data["address"], data["simulated"]) == ("agent-a", "127.0.0.1:7171", True)
