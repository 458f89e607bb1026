"""The agent's Prometheus metrics, and the Grafana dashboard that reads them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentd.metrics import Metrics
from agentd.types import GpuInfo

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"


def samples(m: Metrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def gpu(i, used, total=80 * 2**30, util=0.5):
    return GpuInfo(index=i, uuid=f"GPU-{i}", memory_total=total, memory_used=used, utilization=util)


def populated() -> Metrics:
    clock = iter([0.0, 0.25, 1.0, 1.5])
    m = Metrics("n1", clock=lambda: next(clock))
    m.set_raft(term=3, commit_index=10, applied_index=9, is_leader=False, leader="n2")
    m.election_started()
    with m.placement_timer():
        pass
    with m.placement_timer() as outcome:
        outcome["result"] = "unplaceable"
    m.count_unplaceable(["GPU memory too small", "GPU memory too small", "selector matched no host"])
    m.set_gpus("n1", [gpu(0, 10), gpu(1, 20)], {"GPU-0": 5})
    m.set_instance_states({"running": 2, "backoff": 1})
    m.instance_restarted("llama")
    m.proxy_requests.labels(model="llama", endpoint="completions", code="200").inc()
    m.proxy_seconds.labels(model="llama").observe(0.1)
    m.proxy_retries.labels(model="llama").inc()
    m.proxy_in_flight.labels(model="llama").set(0)
    m.requests_held.labels(model="llama").set(0)
    m.wake_seconds.labels(model="llama").observe(0.5)
    m.wakes.labels(model="llama", result="woken").inc()
    m.scale_events.labels(model="llama", direction="up", reason="queue").inc()
    m.replicas_desired.labels(model="llama").set(2)
    m.replicas_actual.labels(model="llama").set(1)
    m.proxy_queued.labels(model="llama").set(0)
    m.proxy_queue_seconds.labels(model="llama").observe(0.2)
    m.proxy_rejected.labels(model="llama", reason="queue_full").inc()
    m.replica_queue_depth.labels(model="llama", replica="llama-r0-g1").set(1)
    return m


def test_raft_gauges_and_leader_changes():
    m = Metrics("n1")
    m.set_raft(term=1, commit_index=0, is_leader=True, leader="n1")
    m.set_raft(term=1, commit_index=5, is_leader=True, leader="n1")
    s = samples(m)
    assert s[("agentd_raft_is_leader", ())] == 1 and s[("agentd_raft_commit_index", ())] == 5
    assert s[("agentd_raft_leader_changes_total", ())] == 1
    m.set_raft(term=2, commit_index=5, is_leader=False, leader="n3")
    m.set_raft(term=3, commit_index=5, is_leader=False, leader=None)
    s = samples(m)
    assert not any(k[0] == "agentd_raft_leader" for k in s), "no leader: no leader series"
    assert s[("agentd_raft_leader_changes_total", ())] == 3 and s[("agentd_raft_term", ())] == 3


def test_placement_histogram_and_unplaceable_reasons():
    s = samples(populated())
    assert s[("agentd_placement_duration_seconds_count", (("result", "placed"),))] == 1
    assert s[("agentd_placement_duration_seconds_sum", (("result", "placed"),))] == 0.25
    assert s[("agentd_placement_duration_seconds_sum", (("result", "unplaceable"),))] == 0.5
    assert s[("agentd_placement_unplaceable_total", (("reason", "GPU memory too small"),))] == 1, "deduplicated"
    m = Metrics("n1", clock=iter([0.0, 2.0]).__next__)
    with pytest.raises(RuntimeError), m.placement_timer():
        raise RuntimeError("boom")
    assert samples(m)[("agentd_placement_duration_seconds_count", (("result", "error"),))] == 1


def test_gpu_series_follow_the_inventory():
    m = Metrics("n1")
    m.set_gpus("n1", [gpu(0, 10), gpu(1, 20)], {"GPU-1": 7})
    s = samples(m)
    key = (("gpu", "1"), ("host", "n1"), ("uuid", "GPU-1"))
    assert s[("agentd_gpu_memory_used_bytes", key)] == 20 and s[("agentd_gpu_memory_assigned_bytes", key)] == 7
    m.set_gpus("n1", [gpu(0, 11)])
    s = samples(m)
    assert ("agentd_gpu_memory_used_bytes", key) not in s, "a vanished GPU loses its series"
    assert s[("agentd_gpu_memory_used_bytes", (("gpu", "0"), ("host", "n1"), ("uuid", "GPU-0")))] == 11


def test_instance_states_are_all_exported():
    m = Metrics("n1")
    m.set_instance_states({"running": 3})
    m.set_instance_states({"fatal": 1})
    s = samples(m)
    got = {dict(k[1])["state"]: v for k, v in s.items() if k[0] == "agentd_instances"}
    assert got == {"starting": 0, "running": 0, "backoff": 0, "fatal": 1, "stopped": 0}


def test_each_agent_has_its_own_registry():
    a, b = Metrics("a"), Metrics("b")
    a.election_started()
    assert samples(b)[("agentd_raft_elections_total", ())] == 0


def test_the_dashboard_only_uses_metrics_that_exist():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    exported = {name for name, _ in samples(populated())}
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    assert len(exprs) >= 15
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\bagentd_[a-z_]+\b", expr))
        assert names, f"an expression reads no agentd metric: {expr}"
        used |= names
    assert sorted(used - exported) == []
    # Every family the agent exports has a panel.
    families = {n.removesuffix("_bucket").removesuffix("_total") for n in used}
    assert {"agentd_raft_term", "agentd_raft_elections", "agentd_placement_duration_seconds",
            "agentd_placement_unplaceable", "agentd_gpu_memory_total_bytes", "agentd_gpu_memory_used_bytes",
            "agentd_gpu_memory_assigned_bytes", "agentd_instances", "agentd_instance_restarts"} <= families
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    for expr in exprs:
        assert set(re.findall(r"\$(\w+)", expr)) <= variables
