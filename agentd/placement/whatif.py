"""Suggestions for an unplaceable deployment, each one checked by placing again.

A suggestion is only offered when the changed request really places: we
re-run the same placement with one thing changed (other jobs' GPU memory
freed, maintenance exclusions lifted, selector or pins dropped, CPU
offload allowed, a shorter context, another gpu_memory_utilization) and
word the change after the plan it produced ("free GPU 0 on gpu-node-3
(72.0 GiB used by pid 4121)", "use 8 GPUs: TP=8"). Only runs on failure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from agentd.errors import InvalidInput
from agentd.placement.engine import Outcome, Request, attempt, prepare
from agentd.placement.layout import Layout
from agentd.placement.shapes import LayerSplit, Sharded
from agentd.placement.snapshot import Snapshot
from agentd.placement.units import plural
from agentd.types import Assignment, ClusterInventory, DeploymentSpec, Diagnosis, GpuPin, ReplicaPlan

MAX_LISTED = 4
MIN_CTX = 256


def diagnose(req: Request, cluster: ClusterInventory, existing: Sequence[Assignment | ReplicaPlan],
             outcome: Outcome) -> Diagnosis:
    assert outcome.findings is not None
    spec = req.spec
    headline = f"0/{outcome.hosts_total} hosts can run {spec.name} ({req.runtime})"
    suggestions: list[str] = []
    if spec.replicas > 1:
        headline += f" as replica {outcome.failed_replica + 1} of {spec.replicas}"
        if outcome.failed_replica:
            n = outcome.failed_replica
            suggestions.append(f"scale to {n} {plural(n, 'replica')}: only {n} of {spec.replicas} fit")
    suggestions += _what_ifs(req, cluster, existing, outcome)
    if not suggestions:
        suggestions.append("no single change found that makes it fit: add GPUs or hosts with more free memory")
    return outcome.findings.diagnosis(headline, suggestions)


def _try(req: Request, cluster: ClusterInventory, existing, spec: DeploymentSpec,
         snapshot: Snapshot | None = None) -> Outcome | None:
    try:
        changed = prepare(req.hooks, req.model, spec) if spec is not req.spec else req
    except InvalidInput:
        return None
    if changed is not req:
        changed.reuse(req, snapshot)
    out = attempt(changed, cluster, existing, snapshot, explain=False)
    return out if out.placed else None


def _what_ifs(req: Request, cluster: ClusterInventory, existing, outcome: Outcome) -> list[str]:
    spec = req.spec
    out: list[str] = []
    snap = outcome.snapshot or Snapshot.build(cluster, existing)
    if any(g.foreign for hv in snap.hosts for g in hv.gpus):
        got = _try(req, cluster, existing, spec, snap.without_foreign())
        if got is not None:
            hosts = {hv.name: hv for hv in snap.hosts}
            foreign = {(h, g.index): g for h in {k[0] for lo in got.layouts for k in _gpus_of(lo)}
                       for g in hosts[h].gpus if g.foreign}
            used = sorted({foreign[k] for lo in got.layouts for k in _gpus_of(lo) if k in foreign},
                          key=lambda g: (g.host, g.index))
            out += [f"free {g.label} ({g.describe_foreign()})" for g in used[:MAX_LISTED]]
            if len(used) > MAX_LISTED:
                out.append(f"... and {len(used) - MAX_LISTED} more GPUs used by other processes")
    if spec.exclude_gpus:
        got = _try(req, cluster, existing, spec.model_copy(update={"exclude_gpus": ()}), snap)
        if got is not None:
            uuids = {g.uuid: g for hv in snap.hosts for g in hv.gpus}
            back = [uuids[u] for u in spec.exclude_gpus if u in uuids
                    and any(k == (uuids[u].host, uuids[u].index) for lo in got.layouts for k in _gpus_of(lo))]
            if back:
                out += [f"return {g.label} ({g.uuid}) from maintenance" for g in back[:MAX_LISTED]]
    if spec.selector:
        got = _try(req, cluster, existing, spec.model_copy(update={"selector": {}}), snap)
        if got is not None:
            sel = ",".join(f"{k}={v}" for k, v in sorted(spec.selector.items()))
            out.append(f"drop the selector {sel}: {_describe(got.layouts[0])}")
    if spec.pin:
        if all(p.gpus for p in spec.pin):
            hosts_only = tuple(GpuPin(host=p.host) for p in spec.pin)
            got = _try(req, cluster, existing, spec.model_copy(update={"pin": hosts_only}), snap)
            if got is not None:
                out.append(_use(got.layouts[0]))
        if not out or not any(s.startswith("use ") for s in out):
            got = _try(req, cluster, existing, spec.model_copy(update={"pin": ()}), snap)
            if got is not None:
                out.append(f"drop the pins: {_describe(got.layouts[0])}")
    if not spec.options.allow_cpu_offload and _proposes_partial(req, _with_options(spec, allow_cpu_offload=True)):
        got = _try(req, cluster, existing, _with_options(spec, allow_cpu_offload=True), snap)
        if got is not None and got.layouts and got.layouts[0].cpu_layers:
            lo = got.layouts[0]
            total = getattr(lo.demand, "layers", 0)
            out.append(f"allow CPU offload (--allow-cpu-offload): {lo.cpu_layers} of {total} layers would run "
                       f"from RAM on {lo.main.host}")
    ctx = _largest_context(req, cluster, existing, snap)
    if ctx is not None:
        out.append(f"reduce the context to {ctx} tokens (--ctx-size {ctx})")
    for fraction in _fractions(outcome):
        got = _try(req, cluster, existing, _with_options(spec, gpu_memory_utilization=fraction), snap)
        if got is not None:
            out.append(f"set gpu_memory_utilization to {fraction:g} (--gpu-memory-utilization {fraction:g}): "
                       f"{_describe(got.layouts[0])}")
            break
    return out


def _proposes_partial(req: Request, spec: DeploymentSpec) -> bool:
    """Would the runtime propose a partial-offload layout for `spec`? Only such a layout keeps layers
    on the CPU, so without one the allow-CPU-offload what-if cannot yield its suggestion: skip the
    placement (vLLM never proposes one). True when unsure (no filter ran, or the spec is refused)."""
    if req.limits is None:
        return True
    try:
        changed = prepare(req.hooks, req.model, spec)
    except InvalidInput:
        return False  # _try would give up on it too
    shapes = changed.hooks.call("agentd_propose", runtime=changed.runtime, model=changed.model, spec=changed.spec,
                                limits=req.limits)
    return any(isinstance(s, LayerSplit) and s.offload == "partial" for s in shapes or ())


def _gpus_of(layout: Layout):
    for p in layout.parts:
        for i in p.gpus:
            yield (p.host, i)


def _describe(layout: Layout) -> str:
    if isinstance(layout.shape, Sharded):
        return f"{layout.shape.label} on {', '.join(layout.hosts)}"
    n = layout.rpc_servers
    text = f"{layout.shape.label} with the main server on {layout.main.host}"
    if n:
        others = sorted({p.host for p in layout.parts if p.role == "rpc"})
        text += f" and {n} {plural(n, 'rpc-server')} on {', '.join(others)}"
    return text


def _use(layout: Layout) -> str:
    n = layout.gpu_count
    if isinstance(layout.shape, Sharded):
        return f"use {n} {plural(n, 'GPU')}: {layout.shape.label} ({layout.label})"
    return f"use {n} {plural(n, 'GPU')}: {layout.label}"


def _with_options(spec: DeploymentSpec, **changes) -> DeploymentSpec:
    return spec.model_copy(update={"options": spec.options.model_copy(update=changes)})


def _largest_context(req: Request, cluster: ClusterInventory, existing, snap: Snapshot) -> int | None:
    """The longest context (multiple of 256) that places, if a shorter one places at all."""
    spec = req.spec
    current = spec.options.ctx_size or req.model.context_length
    if current <= MIN_CTX or _try(req, cluster, existing, _with_options(spec, ctx_size=MIN_CTX), snap) is None:
        return None
    lo, hi = 1, (current - 1) // MIN_CTX  # in units of MIN_CTX; lo fits, hi may not
    if hi < lo:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _try(req, cluster, existing, _with_options(spec, ctx_size=mid * MIN_CTX), snap) is not None:
            lo = mid
        else:
            hi = mid - 1
    return lo * MIN_CTX


def _fractions(outcome: Outcome) -> list[float]:
    """gpu_memory_utilization values worth trying: higher for a share that did not fit, lower to admit GPUs."""
    assert outcome.findings is not None
    tries: list[float] = []
    for r in outcome.findings.has_detail("budget_fraction"):
        f = r.details["budget_fraction"]
        if f < 0.95:
            tries.append(0.95)
    for r in outcome.findings.has_detail("fraction"):
        total = r.details.get("total") or 0
        if total:
            admit = math.floor(r.details["free"] / total * 20) / 20  # round down to 0.05
            if 0.05 <= admit < r.details["fraction"]:
                tries.append(admit)
    return sorted(set(tries), reverse=True)
