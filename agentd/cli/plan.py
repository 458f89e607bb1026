"""`agentd plan`: what placement would do with a model on a cluster file, without running anything.

The same engine the coordinator runs, on a cluster described in a file
(DESIGN.md §5) instead of live heartbeats. Exit code 3 when nothing fits;
with --json stdout is then the plan with placed=false and its diagnosis.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agentd.cli.common import EXIT_OK, EXIT_UNAVAILABLE, emit, key_values
from agentd.errors import InvalidInput
from agentd.modelinfo import inspect_model
from agentd.placement import place, plan_json
from agentd.types import ClusterInventory, DeploymentSpec, GiB, GpuPin, Plan, RuntimeOptions


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "plan", parents=parents, help="show where a model would be placed on a cluster file",
        description="Place a model on the hosts of a cluster file the way the coordinator would: which hosts "
        "and GPUs, which tensor/pipeline split or layer offload, and the launch parameters. When nothing fits, "
        "explain why per host and GPU, the closest layout, and what would make it fit (exit code 3).")
    p.add_argument("--cluster", required=True, type=Path, metavar="CLUSTER.json",
                   help='{"hosts": [<host inventory>, ...]} as `agentd inventory --json` prints each host')
    p.add_argument("--model", required=True, type=Path, metavar="PATH",
                   help="a .gguf file (any shard), a Hugging Face model directory or its config.json")
    p.add_argument("--runtime", required=True, metavar="RUNTIME", help="vllm or llamabox (or a plugin's runtime)")
    p.add_argument("--name", default=None, help="deployment name in messages (default: from the model file)")
    p.add_argument("--replicas", type=_positive, default=1, metavar="N")
    p.add_argument("--strategy", choices=["binpack", "spread"], default="binpack")
    p.add_argument("--parallelism", choices=["auto", "latency", "gpus"], default="auto",
                   help="vLLM: auto = TP over NVLink, PP over PCIe or across hosts; latency = the largest TP; "
                   "gpus = the fewest GPUs (default auto; docs/placement.md)")
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=None, metavar="F",
                   help="vLLM's share of each GPU, 0 < F <= 1 (default 0.9)")
    p.add_argument("--ctx-size", type=_positive, default=None, metavar="N",
                   help="context length: llama-box --ctx-size, vLLM --max-model-len")
    p.add_argument("--allow-cpu-offload", action="store_true", help="llama-box may keep layers in host RAM")
    p.add_argument("--selector", action="append", default=[], metavar="KEY=VALUE", help="host label to require")
    p.add_argument("--pin", action="append", default=[], metavar="HOST[:GPU,GPU...]",
                   help="place only on this host (and these GPU indices; with indices on every pin the layout "
                   "uses exactly those GPUs)")
    p.add_argument("--exclude-gpu", action="append", default=[], metavar="UUID", help="GPU taken out for maintenance")
    p.set_defaults(func=cmd_plan)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {n}")
    return n


def _fraction(text: str) -> float:
    try:
        f = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < f <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]: {f}")
    return f


def load_cluster(path: Path) -> ClusterInventory:
    """A cluster file: {"hosts": [...]}; a single host inventory is accepted as a one-host cluster."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidInput("no such file", where=str(path)) from None
    except OSError as exc:
        raise InvalidInput(f"cannot read: {exc.strerror or exc}", where=str(path)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"not valid JSON: {exc}", where=str(path)) from None
    if isinstance(data, dict) and "hosts" not in data and "name" in data:
        data = {"hosts": [data]}
    if not isinstance(data, dict):
        raise InvalidInput('expected a JSON object {"hosts": [...]}', where=str(path))
    try:
        return ClusterInventory.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise InvalidInput(f"{err['msg']}" + (f" ({len(exc.errors())} problems)" if len(exc.errors()) > 1 else ""),
                           where=f"{path}: {loc}" if loc else str(path)) from None


def deployment_name(model: Path) -> str:
    """A DNS label from the model's file or directory name: DeepSeek-R1-BF16-00001-of-00030.gguf -> deepseek-r1-bf16."""
    stem = model.name if model.name != "config.json" else model.parent.name
    stem = re.sub(r"(-\d{5}-of-\d{5})?\.gguf$", "", stem, flags=re.IGNORECASE)
    label = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")
    label = re.sub(r"-{2,}", "-", label)[:63].strip("-")
    return label or "model"


def _pins(items: list[str]) -> tuple[GpuPin, ...]:
    pins = []
    for item in items:
        host, _, gpus = item.partition(":")
        if not host:
            raise InvalidInput(f"--pin wants HOST or HOST:GPU,GPU, got {item!r}")
        try:
            indices = tuple(int(g) for g in gpus.split(",") if g.strip()) if gpus else ()
        except ValueError:
            raise InvalidInput(f"--pin GPU indices must be numbers, got {item!r}") from None
        pins.append(GpuPin(host=host, gpus=indices))
    return tuple(pins)


def cmd_plan(args: argparse.Namespace) -> int:
    from agentd.cli.basic import load_plugins

    cluster = load_cluster(args.cluster)
    model = inspect_model(args.model)
    try:
        spec = DeploymentSpec(
            name=args.name or deployment_name(args.model), model=str(args.model), runtime=args.runtime,
            replicas=args.replicas, strategy=args.strategy, selector=key_values(args.selector, "--selector"),
            pin=_pins(args.pin), exclude_gpus=tuple(args.exclude_gpu), parallelism=args.parallelism,
            options=RuntimeOptions(gpu_memory_utilization=args.gpu_memory_utilization, ctx_size=args.ctx_size,
                                   allow_cpu_offload=args.allow_cpu_offload))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InvalidInput(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    plan = place(cluster, model, spec, plugins=load_plugins())
    emit(args, plan_json(plan), lambda: render(spec, plan))
    return EXIT_OK if plan.placed else EXIT_UNAVAILABLE


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def render(spec: DeploymentSpec, plan: Plan) -> str:
    if not plan.placed:
        d = plan.diagnosis
        assert d is not None
        lines = [d.message]
        if d.near_miss:
            lines.append(f"closest: {d.near_miss}")
        lines += [f"to fix: {s}" for s in d.suggestions]
        return "\n".join(lines)
    n = len(plan.replicas)
    lines = [f"placed {spec.name} ({plan.runtime}): {n} replica{'s' if n != 1 else ''}"]
    for i, rp in enumerate(plan.replicas):
        hosts = len({p.host for p in rp.parts})
        lines.append(f"replica {i}: TP={rp.tensor_parallel} PP={rp.pipeline_parallel}, {len(rp.parts)} "
                     f"part{'s' if len(rp.parts) != 1 else ''} on {hosts} host{'s' if hosts != 1 else ''}")
        rows: list[list[Any]] = [["ROLE", "HOST", "GPUS", "LAYERS", "CPU LAYERS", "GIB PER GPU"]]
        for p in rp.parts:
            # A part on a host's RAM (no GPUs, Part.ram booked): "RAM" and the GiB booked there.
            ram = not p.gpus and p.ram
            rows.append([p.role, p.host, "RAM" if ram else ",".join(map(str, p.gpus)), str(p.layers),
                         "-" if p.cpu_layers is None else str(p.cpu_layers),
                         _gib(p.ram) if ram else " ".join(_gib(m) for m in p.memory)])
        widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
        lines += ["  " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.append("  args: " + " ".join(rp.args))
        if rp.why:
            lines.append("  why: " + rp.why)
    return "\n".join(lines)
