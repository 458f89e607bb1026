"""Prometheus metrics of one agent, in a registry the daemon owns (no global default registry).

Owning the registry keeps several agents in one test process apart, and lets
/metrics show agentd's series only. The daemon calls the `set_*` / `observe_*`
methods from the places that know the values; nothing here polls.

Every agent exports its own Raft view (`agentd_raft_is_leader` is 1 on one
agent only), its own GPUs (label `host`) and its own instances, so summing
across agents in PromQL gives the cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

from prometheus_client import CONTENT_TYPE_LATEST as _CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agentd.types import GpuInfo

CONTENT_TYPE = _CONTENT_TYPE
# The supervisor's states (DESIGN.md §4); every one is exported, at 0 when empty, so dashboards show flat lines.
INSTANCE_STATES = ("starting", "running", "backoff", "fatal", "stopped")
PLACEMENT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PROXY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_REASON_LABEL = 120


class Metrics:
    """The agent's collectors and the methods that update them."""

    def __init__(self, node: str, *, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.node = node
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._clock = clock
        r = self.registry
        # Raft
        self.raft_term = Gauge("agentd_raft_term", "Current Raft term seen by this agent.", registry=r)
        self.raft_is_leader = Gauge("agentd_raft_is_leader", "1 when this agent is the Raft leader.", registry=r)
        self.raft_leader = Gauge("agentd_raft_leader", "1 for the node this agent believes leads the cluster.",
                                 ["leader"], registry=r)
        self.raft_commit_index = Gauge("agentd_raft_commit_index", "Highest Raft log index known committed.",
                                       registry=r)
        self.raft_applied_index = Gauge("agentd_raft_applied_index", "Highest Raft log index applied to the state.",
                                        registry=r)
        self.raft_elections = Counter("agentd_raft_elections", "Elections this agent started (as candidate).",
                                      registry=r)
        self._leader: str | None = None
        self.raft_leader_changes = Counter("agentd_raft_leader_changes", "Times this agent saw the leader change.",
                                           registry=r)
        # Placement
        self.placement_seconds = Histogram("agentd_placement_duration_seconds",
                                           "Time to compute one placement decision.", ["result"],
                                           buckets=PLACEMENT_BUCKETS, registry=r)
        self.unplaceable = Counter("agentd_placement_unplaceable", "Placement refusals by reason.", ["reason"],
                                   registry=r)
        # GPUs
        gpu_labels = ["host", "gpu", "uuid"]
        self.gpu_memory_total = Gauge("agentd_gpu_memory_total_bytes", "GPU memory.", gpu_labels, registry=r)
        self.gpu_memory_used = Gauge("agentd_gpu_memory_used_bytes", "GPU memory in use by any process.",
                                     gpu_labels, registry=r)
        self.gpu_memory_assigned = Gauge("agentd_gpu_memory_assigned_bytes",
                                         "GPU memory agentd's placement assigned to its instances.", gpu_labels,
                                         registry=r)
        self.gpu_utilization = Gauge("agentd_gpu_utilization_ratio", "GPU compute utilisation, 0 to 1.", gpu_labels,
                                     registry=r)
        self._gpu_series: dict[str, set[tuple[str, str, str]]] = {}
        # Instances
        self.instances = Gauge("agentd_instances", "Model server instances on this agent by state.", ["state"],
                               registry=r)
        self.instance_restarts = Counter("agentd_instance_restarts", "Model server restarts by deployment.",
                                         ["deployment"], registry=r)
        for state in INSTANCE_STATES:
            self.instances.labels(state=state).set(0)
        # OpenAI-compatible proxy
        self.proxy_requests = Counter("agentd_proxy_requests", "Requests to /v1/ by model, endpoint and status.",
                                      ["model", "endpoint", "code"], registry=r)
        self.proxy_seconds = Histogram("agentd_proxy_response_seconds",
                                       "Time from a /v1/ request to the model server's response headers.",
                                       ["model"], buckets=PROXY_BUCKETS, registry=r)
        self.proxy_retries = Counter("agentd_proxy_retries", "Replicas skipped after a connection failure.",
                                     ["model"], registry=r)
        self.proxy_in_flight = Gauge("agentd_proxy_in_flight", "Requests being proxied now.", ["model"], registry=r)
        # Saturation (docs/on-demand.md, "Routing by load"): every replica full -> wait in line, or 429.
        self.proxy_queued = Gauge("agentd_proxy_queued", "/v1/ requests waiting because every replica is full.",
                                  ["model"], registry=r)
        self.proxy_queue_seconds = Histogram("agentd_proxy_queue_wait_seconds",
                                             "How long a /v1/ request waited for a replica with room.", ["model"],
                                             buckets=PROXY_BUCKETS, registry=r)
        self.proxy_rejected = Counter("agentd_proxy_rejected", "/v1/ requests answered 429, every replica being "
                                      "full, by reason (queue_full | timeout).", ["model", "reason"], registry=r)
        self.replica_queue_depth = Gauge("agentd_replica_queue_depth", "Requests waiting at a replica beyond what it "
                                         "runs, as this agent's proxy sees it (polled replicas only).",
                                         ["model", "replica"], registry=r)
        # Serving on demand (docs/on-demand.md)
        self.requests_held = Gauge("agentd_requests_held", "/v1/ requests held while their model wakes.", ["model"],
                                   registry=r)
        self.wake_seconds = Histogram("agentd_wake_hold_seconds",
                                      "How long a /v1/ request was held for its model to wake and load.",
                                      ["model"], buckets=PROXY_BUCKETS, registry=r)
        self.wakes = Counter("agentd_wakes", "Wake calls this agent's proxy made, by result (woken | failed).",
                             ["model", "result"], registry=r)
        # The report path (docs/cluster.md, "Liveness by lease"), on the leader: how host inventories arrive.
        self.report_inventories = Counter("agentd_report_inventories", "Host inventories that reached this agent "
                                          "as leader: whole (the JSON crossed), named (by a digest it held), asked "
                                          "(by a digest it did not hold: sent again whole).", ["how"], registry=r)
        # Replicas by load (docs/on-demand.md), on the leader: its decisions, and the count it aims for vs has.
        self.scale_events = Counter("agentd_scale_events", "Replica count changes by load, by direction (up | "
                                    "down) and reason (queue | bounds | unplaceable).",
                                    ["model", "direction", "reason"], registry=r)
        self.replicas_desired = Gauge("agentd_replicas_desired", "Replicas the autoscaler wants (leader only).",
                                      ["model"], registry=r)
        self.replicas_actual = Gauge("agentd_replicas_actual", "Replicas an autoscaled deployment has, those being "
                                     "removed not counted (leader only).", ["model"], registry=r)

    # ------------------------------------------------------------ Raft

    def set_raft(self, *, term: int, commit_index: int, applied_index: int | None = None, is_leader: bool,
                 leader: str | None) -> None:
        """Called after every Raft state change (term, role, commit); cheap enough for each one."""
        self.raft_term.set(term)
        self.raft_commit_index.set(commit_index)
        if applied_index is not None:
            self.raft_applied_index.set(applied_index)
        self.raft_is_leader.set(1 if is_leader else 0)
        leader = leader or None
        if leader != self._leader:
            self.raft_leader_changes.inc()
            self.raft_leader.clear()
            if leader:
                self.raft_leader.labels(leader=leader).set(1)
            self._leader = leader

    def election_started(self) -> None:
        self.raft_elections.inc()

    # ------------------------------------------------------------ placement

    @contextmanager
    def placement_timer(self) -> Iterator[dict[str, str]]:
        """Times the block; set `outcome["result"]` to "unplaceable" inside it when placement failed."""
        outcome = {"result": "placed"}
        start = self._clock()
        try:
            yield outcome
        except BaseException:
            outcome["result"] = "error"
            raise
        finally:
            self.placement_seconds.labels(result=outcome["result"]).observe(max(0.0, self._clock() - start))

    def observe_placement(self, seconds: float, *, placed: bool) -> None:
        self.placement_seconds.labels(result="placed" if placed else "unplaceable").observe(seconds)

    def count_unplaceable(self, reasons: Iterable[str]) -> None:
        """One count per distinct reason of a refused deployment. Reasons are stable sentences
        without numbers (DESIGN.md §3), so they make bounded label values."""
        for reason in dict.fromkeys(reasons):
            self.unplaceable.labels(reason=reason[:MAX_REASON_LABEL]).inc()

    # ------------------------------------------------------------ GPUs

    def set_gpus(self, host: str, gpus: Iterable[GpuInfo], assigned: Mapping[str, int] | None = None) -> None:
        """Replace the series of `host`'s GPUs; `assigned` maps GPU UUID to bytes agentd assigned on it.

        A GPU that disappeared (unplugged, MIG reconfigured) loses its series
        rather than freezing at its last value.
        """
        assigned = assigned or {}
        seen: set[tuple[str, str, str]] = set()
        for g in gpus:
            key = (host, str(g.index), g.uuid)
            seen.add(key)
            self.gpu_memory_total.labels(*key).set(g.memory_total)
            self.gpu_memory_used.labels(*key).set(g.memory_used)
            self.gpu_memory_assigned.labels(*key).set(assigned.get(g.uuid, 0))
            self.gpu_utilization.labels(*key).set(g.utilization)
        for key in self._gpu_series.get(host, set()) - seen:
            for gauge in (self.gpu_memory_total, self.gpu_memory_used, self.gpu_memory_assigned,
                          self.gpu_utilization):
                gauge.remove(*key)
        self._gpu_series[host] = seen

    # ------------------------------------------------------------ instances

    def set_instance_states(self, counts: Mapping[str, int]) -> None:
        """Counts by supervisor state; states not given are 0."""
        for state in dict.fromkeys([*INSTANCE_STATES, *counts]):
            self.instances.labels(state=state).set(counts.get(state, 0))

    def instance_restarted(self, deployment: str) -> None:
        self.instance_restarts.labels(deployment=deployment).inc()

    # ------------------------------------------------------------ output

    def render(self) -> bytes:
        return generate_latest(self.registry)
