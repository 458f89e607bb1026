"""The search: from a prepared request and a frozen cluster snapshot to the layouts of every replica, or the
findings of why not. `agentd.placement.planner.place` turns these into a Plan (and whatif.py a diagnosis).

The phases follow the Kubernetes scheduling framework. Plugins *declare*
constraints, scorers and memory estimates (called once per request);
the core *filters* hosts (selector, pins) and GPUs (maintenance, device
constraints), asks the runtime plugin to *propose* layout shapes in its
order of preference, checks each shape against the shape constraints,
finds GPUs for it greedily (sharded.py, layersplit.py), checks the
candidate against the layout constraints and *scores* candidates of the
same shape. The first shape with a valid candidate wins. Every rejection
is recorded, so a failure explains itself (findings.py, whatif.py).

Pure: no I/O, no clocks, no randomness; the same input gives the same plan.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

from agentd.errors import AgentdError, InvalidInput, PluginError
from agentd.placement.constraints import Constraint, Rejection
from agentd.placement.demand import LayerDemand, ShardDemand
from agentd.placement.findings import CANDIDATE, DEVICE, HOST, SHAPE, STATIC, Findings
from agentd.placement.layersplit import LayerSplitSearch
from agentd.placement.layout import LaunchParams, Layout
from agentd.placement.links import bounds as link_bounds
from agentd.placement.modelbytes import ModelBytes, model_bytes
from agentd.placement.shapes import LayerSplit, Shape, ShapeLimits, Sharded
from agentd.placement.sharded import Candidates, ShardedSearch
from agentd.placement.snapshot import GpuView, HostView, Snapshot
from agentd.placement.strategy import Strategy
from agentd.types import (
    Assignment,
    ClusterInventory,
    DeploymentSpec,
    ModelInfo,
    Part,
    ReplicaPlan,
)

log = logging.getLogger("agentd.placement")

LEVELS = ("check_static", "check_device", "check_shape", "check_layout")
_UNCHECKED: Any = object()  # a shape the checks have not seen (None: they passed it)


class Hooks:
    """The placement hooks, with any plugin failure turned into a PluginError naming the hook."""

    def __init__(self, plugins: Any):
        self.relay = getattr(plugins, "hook", plugins)

    def call(self, name: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.relay, name)(**kwargs)
        except AgentdError:
            raise
        except Exception as exc:
            raise PluginError(f"hook {name} failed: {type(exc).__name__}: {exc}") from exc


@dataclass
class Request:
    """One deployment's declarations, gathered once: the checks per level and the scorers."""

    hooks: Hooks
    model: ModelInfo
    spec: DeploymentSpec
    checks: dict[str, list[tuple[Any, Any]]] = field(default_factory=dict)
    scorers: list[Any] = field(default_factory=list)
    # Per-request caches: filter results per HostView (replicas share untouched hosts), and what the
    # searches derive per host. Keyed by id() with the object kept alongside, so ids are never reused.
    host_cache: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    # A filter result per host name: what the host filters decide is the same for every view of the host.
    gates: dict[str, Any] = field(default_factory=dict)
    # The first filter result per host name: a changed view of the host (a replica booked on it, the
    # diagnosis freeing other jobs' memory) re-checks only the GPUs whose state changed.
    by_name: dict[str, Any] = field(default_factory=dict)
    search_cache: dict[Any, Any] = field(default_factory=dict)
    # Each host inventory's links (gpu_links read once): for shapes that ask for NVLink or PCIe.
    links: dict[int, Any] = field(default_factory=dict)
    # agentd_estimate and the shape checks per shape (pure, and independent of the cluster): shared by
    # replicas and what-ifs.
    demands: dict[Shape, Any] = field(default_factory=dict)
    shape_verdicts: dict[Shape, Rejection | None] = field(default_factory=dict)
    # agentd_propose per ShapeLimits (pure): the next replica and the what-if that frees memory ask again.
    proposals: dict[ShapeLimits, _Replay] = field(default_factory=dict)
    # What the host filters of the latest attempt left (independent of free memory): the what-ifs
    # ask the runtime what it would propose under a changed request.
    limits: ShapeLimits | None = None
    # Hosts without GPUs are candidates: the runtime declares RuntimeInfo.host_memory and the deployment
    # allows CPU offload.
    cpu_hosts: bool = False
    # The part roles whose hosts need the model files (agentd_model_file_roles; None: every role), and
    # where the files are in the cluster of the latest attempt (None: no host reports a model catalog).
    file_roles: frozenset[str] | None = None
    model_bytes: ModelBytes | None = None

    @cached_property
    def excluded(self) -> frozenset[str]:
        return frozenset(self.spec.exclude_gpus)

    def reuse(self, other: Request, snapshot: Snapshot | None) -> None:
        """Take over what `other` (the request this one changes) found that holds for this one too:
        capacities per host view (valid for any request), the host filters' results when the selector
        and pins are the same, the device filters' too when their rules are (on `snapshot`, a
        snapshot `other` placed on), and the shape checks' when those are."""
        a, b = self.spec, other.spec
        self.search_cache = other.search_cache
        self.links = other.links
        # Hosts without GPUs pass the host filters or not depending on cpu_hosts (allow_cpu_offload).
        if (a.selector, a.pin) == (b.selector, b.pin) and self.cpu_hosts == other.cpu_hosts:
            self.gates = other.gates
            if snapshot is not None and a.exclude_gpus == b.exclude_gpus and self._same("check_device", other):
                self.host_cache = other.host_cache
                self.by_name = other.by_name
        if self._same("check_shape", other):
            self.shape_verdicts = other.shape_verdicts

    def _same(self, level: str, other: Request) -> bool:
        return [c for c, _ in self.checks[level]] == [c for c, _ in other.checks[level]]

    @property
    def runtime(self) -> str:
        return self.spec.runtime

    def run(self, level: str, *args: Any) -> Rejection | None:
        for c, check in self.checks[level]:
            try:
                r = check(*args)
            except AgentdError:
                raise
            except Exception as exc:
                raise PluginError(f"constraint {_name(c)} failed in {level}: {type(exc).__name__}: {exc}") from exc
            if r is not None:
                return r
        return None

    def propose(self, limits: ShapeLimits) -> Iterable[Shape]:
        """agentd_propose, asked once per limits."""
        replay = self.proposals.get(limits)
        if replay is None:
            shapes = self.hooks.call("agentd_propose", runtime=self.runtime, model=self.model, spec=self.spec,
                                     limits=limits)
            if shapes is None:
                raise PluginError(f"no plugin proposes layouts for runtime {self.runtime!r}")
            replay = self.proposals[limits] = _Replay(shapes)
        return replay

    def check_shape(self, shape: Shape) -> Rejection | None:
        """Every constraint's check_shape, run once per shape."""
        why = self.shape_verdicts.get(shape, _UNCHECKED)
        if why is _UNCHECKED:
            why = self.shape_verdicts[shape] = self.run("check_shape", shape)
        return why

    def validate(self, layout: Layout) -> Rejection | None:
        why = self.run("check_layout", layout)
        if why is None and self.model_bytes is not None:
            return self.model_bytes.check_layout(layout)
        return why

    def score(self, layout: Layout) -> float:
        total = 0.0
        for s in self.scorers:
            try:
                total += float(getattr(s, "weight", 1.0)) * float(s.score(layout))
            except Exception as exc:
                raise PluginError(f"scorer {_name(s)} failed: {type(exc).__name__}: {exc}") from exc
        return total


class _Replay:
    """An iterable that keeps what it pulls from `items`: iterating again replays that first, and pulls
    more only past it (a search stops at the first shape that fits)."""

    def __init__(self, items: Iterable[Any]):
        self._items = iter(items)
        self._kept: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        yield from self._kept
        for item in self._items:
            self._kept.append(item)
            yield item


def _name(obj: Any) -> str:
    return getattr(obj, "name", "") or type(obj).__name__


def _flatten(results: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for r in results or ():
        if r is None:
            continue
        out.extend(r if isinstance(r, list | tuple) else [r])
    return out


def prepare(plugins: Any, model: ModelInfo, spec: DeploymentSpec) -> Request:
    """Check the runtime serves this model, and gather every plugin's declarations."""
    hooks = plugins if isinstance(plugins, Hooks) else Hooks(plugins)
    infos = [i for i in hooks.call("agentd_runtime") if i is not None]
    info = next((i for i in infos if i.name == spec.runtime), None)
    if info is None:
        known = ", ".join(sorted(i.name for i in infos)) or "none loaded"
        raise InvalidInput(f"unknown runtime {spec.runtime!r} (available: {known})")
    if info.formats and model.format not in info.formats:
        raise InvalidInput(f"runtime {spec.runtime!r} serves {', '.join(info.formats)} models, "
                           f"not {model.format} ({model.name or model.architecture})")
    req = Request(hooks, model, spec,
                  cpu_hosts=bool(getattr(info, "host_memory", False)) and spec.options.allow_cpu_offload)
    args = {"runtime": spec.runtime, "model": model, "spec": spec}
    constraints = _flatten(hooks.call("agentd_constraints", **args))
    for level in LEVELS:
        req.checks[level] = [(c, getattr(c, level)) for c in constraints if _overrides(c, level)]
    req.scorers = _flatten(hooks.call("agentd_scorers", **args))
    roles = hooks.call("agentd_model_file_roles", runtime=spec.runtime)
    req.file_roles = None if roles is None else frozenset(roles)
    return req


def _overrides(c: Any, level: str) -> bool:
    method = getattr(type(c), level, None)
    if method is None:
        return False
    return not (isinstance(c, Constraint) and method is getattr(Constraint, level))


# --------------------------------------------------------------------------- attempt


@dataclass
class Outcome:
    layouts: list[Layout]
    findings: Findings | None  # why the replica at `failed_replica` could not be placed
    failed_replica: int | None
    hosts_total: int
    snapshot: Snapshot | None = None  # the cluster the attempt started from
    whys: list[str] = field(default_factory=list)  # per placed replica: the runtime's agentd_explain

    @property
    def placed(self) -> bool:
        return self.findings is None


def attempt(req: Request, cluster: ClusterInventory, existing: Sequence[Assignment | ReplicaPlan] = (),
            snapshot: Snapshot | None = None, explain: bool = True) -> Outcome:
    """Place every replica in turn, booking each one's memory before the next: no double booking.

    `snapshot`, when given, must be Snapshot.build(cluster, existing): what-ifs reuse it. Without
    `explain` (a what-if asks only whether it places) the findings of a failure are incomplete.
    """
    start = snap = snapshot or Snapshot.build(cluster, existing)
    req.model_bytes = bytes_ = model_bytes(cluster, req.spec.model, req.model, req.file_roles)
    holders = bytes_.holders if bytes_ is not None else frozenset()
    layouts: list[Layout] = []
    whys: list[str] = []
    replicas_on: dict[str, int] = {}
    for r in range(req.spec.replicas):
        got = place_one(req, snap, Strategy(req.spec.strategy, dict(replicas_on), holders), explain,
                        whys if explain else None)
        if isinstance(got, Findings):
            return Outcome(layouts, got, r, len(cluster.hosts), start, whys)
        layouts.append(got)
        for h in got.hosts:
            replicas_on[h] = replicas_on.get(h, 0) + 1
        if r + 1 < req.spec.replicas:
            snap = snap.reserve(got.reservations())
    return Outcome(layouts, None, None, len(cluster.hosts), start, whys)


def place_one(req: Request, snap: Snapshot, strategy: Strategy | None = None,
              explain: bool = True, whys: list[str] | None = None) -> Layout | Findings:
    """The first layout that passes every check, or the findings that explain why there is none (only
    some of them without `explain`: the search then skips what only a diagnosis needs). With `whys`,
    the runtime's reason for the layout (agentd_explain) is appended to it.

    A shape that asks for linked GPUs (`Sharded.link`) is a preference: its checks and estimate are
    the plain shape's, and its misses are not findings (the plain shape, proposed too, explains).
    """
    strategy = strategy or Strategy(req.spec.strategy)
    findings = Findings()
    r = req.run("check_static")
    if r is not None:
        findings.add(STATIC, r)
        return findings
    cands, limits, pinned = _filter(req, snap, findings if explain else None)
    req.limits = limits
    if limits.exact is not None and sum(len(g) for _, g in cands.hosts) < sum(n for _, n in limits.exact):
        return findings  # a pinned GPU is unusable or missing: its rejection says why; no layout can help
    shapes = req.propose(limits)
    sharded: ShardedSearch | None = None
    split: LayerSplitSearch | None = None
    demands = req.demands
    matched = False
    score = req.score if req.scorers else None
    for shape in shapes:
        if limits.exact is not None and not _matches_exact(shape, limits.exact):
            continue
        matched = True
        preferred = isinstance(shape, Sharded) and shape.link != "any"
        base = shape.plain if preferred else shape
        why = req.check_shape(base)
        if why is not None:
            if not preferred:
                findings.add(SHAPE, why)
            continue
        demand = demands.get(base)
        if demand is None:
            demand = demands[base] = req.hooks.call(
                "agentd_estimate", runtime=req.runtime, model=req.model, spec=req.spec, shape=base)
        if isinstance(shape, Sharded):
            if not isinstance(demand, ShardDemand):
                raise PluginError(f"agentd_estimate returned {type(demand).__name__} for {shape.label}, "
                                  "expected ShardDemand")
            sharded = sharded or ShardedSearch(cands, strategy, req.search_cache, req.links)
            got = sharded.find(shape, demand, explain)
            if got is None:
                continue
            if isinstance(got, Rejection):
                findings.add(CANDIDATE, got)
                continue
            why = req.validate(got)
            if why is not None:
                if not preferred:
                    findings.add(CANDIDATE, why)
                continue
            if whys is not None:
                whys.append(_explain(req, got, limits, cands, strategy, sharded))
            return got
        if isinstance(shape, LayerSplit):
            if not isinstance(demand, LayerDemand):
                raise PluginError(f"agentd_estimate returned {type(demand).__name__} for {shape.label}, "
                                  "expected LayerDemand")
            split = split or LayerSplitSearch(cands, strategy, limits.exact, pinned, ram=req.cpu_hosts)
            got = split.find(shape, demand, req.validate, score)
            if isinstance(got, Layout):
                if whys is not None:
                    whys.append(_explain(req, got, limits, cands, strategy, sharded))
                return got
            if log.isEnabledFor(logging.DEBUG):
                for rej in got:
                    log.debug("rejected %s %s: %s (%s)", rej.subject, rej.where, rej.reason, rej.detail_text())
            findings.extend(CANDIDATE, got)
            continue
        raise PluginError(f"unknown layout shape {shape!r} from agentd_propose")
    if limits.exact is not None and not matched:
        pins = ", ".join(f"{n} GPU(s) on {h}" for h, n in limits.exact)
        findings.add(SHAPE, Rejection("pinned layout", f"matches no layout {req.runtime} can run",
                                      pins, {"pins": [list(p) for p in limits.exact]}, where=pins))
    if explain and not findings:
        findings.add(HOST, Rejection("cluster", "has no hosts", subject_plural="cluster"))
    return findings


def _explain(req: Request, layout: Layout, limits: ShapeLimits, cands: Candidates, strategy: Strategy,
             sharded: ShardedSearch | None) -> str:
    """The runtime's sentence on why it chose `layout` (agentd_explain), or "" when it gives none.

    The hook gets `find(shapes)`: the first of `shapes` that would place on the same snapshot, as
    this search would find it (same checks, same strategy), booking nothing; so a plugin can name
    the layout another policy would have chosen. Sharded shapes only: a plain scan of the others.
    """
    search = sharded

    def find(shapes: Iterable[Shape]) -> Layout | None:
        nonlocal search
        for shape in shapes:
            if not isinstance(shape, Sharded):
                continue
            if limits.exact is not None and not _matches_exact(shape, limits.exact):
                continue
            base = shape.plain
            if req.check_shape(base) is not None:
                continue
            demand = req.demands.get(base)
            if demand is None:
                demand = req.demands[base] = req.hooks.call(
                    "agentd_estimate", runtime=req.runtime, model=req.model, spec=req.spec, shape=base)
            if not isinstance(demand, ShardDemand):
                continue
            search = search or ShardedSearch(cands, strategy, req.search_cache, req.links)
            got = search.find(shape, demand, explain=False)
            if isinstance(got, Layout) and req.validate(got) is None:
                return got
        return None

    text = req.hooks.call("agentd_explain", runtime=req.runtime, model=req.model, spec=req.spec, layout=layout,
                          limits=limits, find=find)
    return text if isinstance(text, str) else ""


def _matches_exact(shape: Shape, exact: tuple[tuple[str, int], ...]) -> bool:
    if isinstance(shape, Sharded):
        if shape.hosts == 1:
            return len(exact) == 1 and exact[0][1] == shape.gpus
        return len(exact) == shape.hosts and all(n == shape.tp for _, n in exact)
    return True


class _HostResult(NamedTuple):
    """What the host and device filters made of one host: cached per HostView for the next replica.

    A tuple, not a dataclass: one is built per host on every placement.
    """

    stage: int  # HOST when the host filters turned the whole host down, else DEVICE
    rejections: tuple[Rejection, ...]
    eligible: tuple[GpuView, ...] | None  # None: passed the host filters, not judged by the device filters yet
    considered: int  # GPUs that passed the host filters (pinned ones only, when pinned)
    max_memory: int
    views: tuple[GpuView, ...] = ()  # the GPUs the device filters judged, and their verdicts
    verdicts: tuple[Rejection | None, ...] = ()


def _filter(req: Request, snap: Snapshot, findings: Findings | None) -> tuple[Candidates, ShapeLimits, dict]:
    """Host filters (selector, pins, GPUs present), then device filters (maintenance, pins, constraints).

    Without `findings` (a what-if, which asks only whether a layout fits, not why none does) a
    host's device filters run when a search first looks at the host: see Candidates.
    """
    spec = req.spec
    pinned: dict[str, tuple[int, ...]] = {}
    for p in spec.pin:
        pinned[p.host] = tuple(dict.fromkeys(pinned.get(p.host, ()) + p.gpus))
    exact = None
    if spec.pin and all(p.gpus for p in spec.pin):
        exact = tuple((h, len(g)) for h, g in pinned.items())
    if findings is not None:
        known = {hv.name for hv in snap.hosts}
        for host in pinned:
            if host not in known:
                findings.add(HOST, Rejection("pinned host", "is not in the cluster", where=host,
                                             details={"host": host}))
    rows: list[tuple[HostView, tuple[GpuView, ...] | None]] = []
    counted = max_per_host = total_gpus = max_mem = unjudged = 0
    cache = req.host_cache
    gates = req.gates
    for hv in snap.hosts:
        hit = cache.get(id(hv))
        if hit is not None and hit[0] is hv:  # a snapshot shares untouched hosts with the one before
            res = hit[1]
            eligible = res.eligible
        elif findings is not None:
            res = gates[hv.name] = _filter_host(req, hv, pinned)
            eligible = res.eligible
        else:  # the host filters only: their verdict on another view of the host holds for this one
            res = gates.get(hv.name)
            if res is None:
                res = gates[hv.name] = _filter_host(req, hv, pinned, judge=False)
            eligible = None if res.stage == DEVICE else ()
        if findings is not None and res.rejections:
            findings.add_all(res.stage, res.rejections)
        considered = res.considered
        if not considered and req.cpu_hosts and not hv.gpus and res.stage == DEVICE and not res.rejections:
            counted += 1  # a host without GPUs, its RAM the runtime's device: a main-server candidate
            rows.append((hv, ()))
        elif considered:
            counted += 1
            total_gpus += considered
            if considered > max_per_host:
                max_per_host = considered
            if res.max_memory > max_mem:
                max_mem = res.max_memory
            if eligible is None:
                unjudged += 1
            rows.append((hv, eligible))

    def judge(i: int) -> tuple[GpuView, ...]:
        eligible = _filter_host(req, rows[i][0], pinned).eligible
        assert eligible is not None
        return eligible

    nvlink = pcie = 0
    links = req.links
    for hv, _ in rows:
        if hv.info.gpu_links:
            nv, pc = link_bounds(hv.info, links)
            if nv > nvlink:
                nvlink = nv
            if pc > pcie:
                pcie = pc
    limits = ShapeLimits(hosts=counted, max_gpus_per_host=max_per_host, gpus=total_gpus, max_gpu_memory=max_mem,
                         exact=exact, nvlink_gpus=nvlink, pcie_gpus=pcie)
    return Candidates(rows, unjudged, max_mem, judge), limits, pinned


def _filter_host(req: Request, hv: HostView, pinned: dict[str, tuple[int, ...]], judge: bool = True) -> _HostResult:
    """The host filters, then (`judge`) the device filters; a judged host's result is cached.

    Not judged, a host that passes the host filters comes back with eligible None. A GPU in the
    same state as in this request's first judgment of the host (same inventory entry, free,
    foreign and assigned memory: a replica booked elsewhere on the host, the diagnosis freeing
    other jobs' memory) gets the same verdict without running the checks again: device checks
    are pure functions of the GPU view."""
    why = _host_rejection(req, hv, pinned)
    if why is not None:  # final, whatever the GPUs' state
        res = _HostResult(HOST, (why,), (), 0, 0)
        req.host_cache[id(hv)] = (hv, res)
        return res
    rejections: list[Rejection] = []
    reject = rejections.append
    want = pinned.get(hv.name) or None
    gpus = hv.gpus
    if want:
        present = {g.index for g in gpus}
        for i in want:
            if i not in present:
                reject(Rejection("pinned GPU", "does not exist", where=f"GPU {i} on {hv.name}",
                                 details={"host": hv.name, "index": i}))
        gpus = tuple(g for g in gpus if g.index in want)
    if not judge:
        return _HostResult(DEVICE, tuple(rejections), None, len(gpus), max((g.total for g in gpus), default=0))
    before = req.by_name.get(hv.name)
    excluded = req.excluded
    device_checks = req.checks["check_device"]
    eligible = []
    keep = eligible.append
    verdicts: list[Rejection | None] = []
    judged = verdicts.append
    old_views = before.views if before is not None and len(before.views) == len(gpus) else None
    max_mem = 0
    for k, g in enumerate(gpus):
        if g.total > max_mem:
            max_mem = g.total
        if old_views is not None:
            o = old_views[k]
            if o.info is g.info and o.free == g.free and o.foreign == g.foreign and o.assigned == g.assigned:
                why = before.verdicts[k]
                judged(why)
                if why is None:
                    keep(g)
                else:
                    reject(why)
                continue
        if excluded and (g.uuid in excluded or (g.info.parent_uuid and g.info.parent_uuid in excluded)):
            why = Rejection("GPU", "excluded for maintenance", g.uuid, {"uuid": g.uuid}, where=g.label)
            reject(why)
            judged(why)
            continue
        if g.info.cordoned:
            why = Rejection("GPU", "cordoned", g.uuid, {"uuid": g.uuid}, where=g.label)
            reject(why)
            judged(why)
            continue
        for c, check in device_checks:
            try:
                why = check(g)
            except AgentdError:
                raise
            except Exception as exc:
                raise PluginError(f"constraint {_name(c)} failed in check_device: "
                                  f"{type(exc).__name__}: {exc}") from exc
            if why is not None:
                reject(why)
                judged(why)
                break
        else:
            keep(g)
            judged(None)
    res = _HostResult(DEVICE, tuple(rejections), gpus if len(eligible) == len(gpus) else tuple(eligible),
                      len(gpus), max_mem, gpus, tuple(verdicts))
    req.host_cache[id(hv)] = (hv, res)
    if before is None:
        req.by_name[hv.name] = res
    return res


def _host_rejection(req: Request, hv: HostView, pinned: dict[str, tuple[int, ...]]) -> Rejection | None:
    selector = req.spec.selector
    if selector and any(hv.labels.get(k) != v for k, v in selector.items()):
        text = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        return Rejection("host", f"excluded by selector {text}", where=hv.name)
    if hv.info.cordoned:
        return Rejection("host", "cordoned", hv.info.cordoned, where=hv.name)
    installed = hv.info.runtimes  # empty: an older agent or a cluster file, taken to run every runtime
    if installed and req.spec.runtime not in installed:
        has = ", ".join(f"{k} {v}".strip() for k, v in installed.items())
        return Rejection("host", f"without {req.spec.runtime} installed", f"{hv.name} has {has}",
                         {"installed": dict(installed)}, where=hv.name)
    if pinned and hv.name not in pinned:
        return Rejection("host", "not pinned", where=hv.name)
    if not hv.gpus and not req.cpu_hosts:
        return Rejection("host", "without GPUs", where=hv.name)
    return None


# --------------------------------------------------------------------------- plan


def replica_plan(req: Request, layout: Layout, why: str = "") -> ReplicaPlan:
    params = req.hooks.call("agentd_layout_args", runtime=req.runtime, model=req.model, spec=req.spec,
                            layout=layout) or LaunchParams(
        env=tuple({"CUDA_VISIBLE_DEVICES": ",".join(map(str, p.gpus))} for p in layout.parts))
    parts = []
    for i, p in enumerate(layout.parts):
        env = dict(params.env[i]) if i < len(params.env) else {}
        parts.append(Part(host=p.host, gpus=p.gpus, role=p.role, layers=p.layers, cpu_layers=p.cpu_layers,
                          memory=p.memory, env=env, layer_split=p.layer_split, ram=p.ram))
    shape = layout.shape
    tp, pp = (shape.tp, shape.pp) if isinstance(shape, Sharded) else (1, 1)
    return ReplicaPlan(tensor_parallel=tp, pipeline_parallel=pp, parts=tuple(parts), args=tuple(params.args),
                       score=req.score(layout) if req.scorers else 0.0, why=why)
