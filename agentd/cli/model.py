"""`agentd model inspect`: what placement will know about a model, read from its headers; `agentd model ls`:
the cluster's catalog, which host holds which model (docs/models.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agentd.cli.common import emit
from agentd.types import GiB, MiB, ModelInfo


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("model", parents=parents, help="inspect model files",
                       description="Inspect model files the way placement sees them.")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True, parser_class=type(p))
    s = msub.add_parser(
        "inspect", parents=parents, help="show a model's shape, sizes and KV-cache facts",
        description="Read a GGUF file (any shard of a split model; the others are found beside it), a Hugging "
        "Face model directory or its config.json, and print what placement uses: layers, heads, KV heads, "
        "head size, context, quantization, weight bytes per layer and for the non-repeating tensors, the "
        "KV-cache shape (MLA for DeepSeek V2/V3/R1), MoE facts and the files. Only headers are read, never "
        "tensor data. With --json it prints the ModelInfo value.")
    s.add_argument("path", type=Path, metavar="PATH", help="a .gguf file, a model directory or a config.json")
    s.add_argument("--mmproj", type=Path, default=None, metavar="FILE",
                   help="the multimodal projector GGUF of a GGUF model (default: the single mmproj*.gguf "
                   "beside it, if there is one)")
    s.set_defaults(func=cmd_inspect)
    s = msub.add_parser(
        "ls", parents=parents, help="list the models the cluster's hosts hold",
        description="The cluster's model catalog, from the hosts' reports to the leader: each model (keyed by "
        "content digest), its size and shape, and the hosts that hold it complete or partly. The same name "
        "reported with different digests is flagged: deploy it as NAME@sha256:DIGEST. Broken models are "
        "listed with the reason.")
    s.add_argument("--server", default=None, metavar="HOST:PORT", help="agent to ask (default: the client config)")
    s.set_defaults(func=cmd_ls)
    s = msub.add_parser(
        "rm", parents=parents, help="delete copies of a model that no deployment uses",
        description="Delete the copies of MODEL (a catalog name NAME[@sha256:DIGEST]) on every host that holds "
        "it, or on --host only. Each holder deletes its own copy, and refuses while a deployment uses the "
        "model, naming the deployments. Exit 1 when a copy was not deleted.")
    s.add_argument("model", metavar="MODEL", help="NAME or NAME@sha256:DIGEST (agentd model ls)")
    s.add_argument("--host", action="append", default=[], metavar="HOST", help="only this host (repeatable)")
    s.add_argument("--server", default=None, metavar="HOST:PORT", help="agent to ask (default: the client config)")
    s.set_defaults(func=cmd_rm)


def cmd_inspect(args: argparse.Namespace) -> int:
    from agentd.modelinfo import inspect_model

    info = inspect_model(args.path, mmproj=args.mmproj)
    emit(args, json.loads(info.model_dump_json()), lambda: render(info))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from agentd import catalog, formats
    from agentd.api.client import ControlClient
    from agentd.types import HostInventory

    with ControlClient.for_cli(getattr(args, "server", None)) as c:
        nodes = c.nodes()
    hosts = [formats.validate_lenient(HostInventory, n.inventory_json) for n in nodes if n.inventory_json]
    entries, broken = catalog.build(hosts)
    data = {"models": [e.as_json() for e in entries],
            "broken": [{"host": b.host, "name": b.name, "path": b.path, "reason": b.reason} for b in broken]}
    emit(args, data, lambda: render_catalog(entries, broken))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    import grpc

    from agentd import catalog, formats
    from agentd.api.client import ControlClient, error_from_rpc
    from agentd.errors import InvalidInput
    from agentd.types import HostInventory
    from agentd.v1 import models_pb2 as mpb
    from agentd.v1 import models_pb2_grpc as mpb_grpc

    with ControlClient.for_cli(getattr(args, "server", None)) as c:
        nodes = c.nodes()
    hosts = [formats.validate_lenient(HostInventory, n.inventory_json) for n in nodes if n.inventory_json]
    model, _ = catalog.resolve(args.model, hosts)
    digest = model.partition("@")[2]
    address = {n.name: n.address for n in nodes}
    holders = [h.name for h in hosts if any(m.digest == digest for m in h.models)]
    unknown = sorted(set(args.host) - {h.name for h in hosts})
    if unknown:
        raise InvalidInput(f"no host named {', '.join(unknown)} (agentd nodes lists them)", where="--host")
    targets = [h for h in holders if not args.host or h in args.host]
    if not targets:
        raise InvalidInput(f"{model} is not on {', '.join(args.host)}", where="--host")
    results, failed = [], 0
    for host in targets:
        with ControlClient.for_cli(address[host]) as c:
            try:
                reply = mpb_grpc.ModelsStub(c._channel).Remove(mpb.RemoveRequest(digest=digest), timeout=c.timeout)
                results.append({"host": host, "deleted": reply.path, "bytes": reply.bytes})
            except grpc.RpcError as exc:
                failed += 1
                results.append({"host": host, "error": str(error_from_rpc(exc, c.address))})
    emit(args, {"model": model, "results": results}, lambda: "\n".join(
        f"{r['host']}: deleted {r['deleted']} ({_size(r['bytes'])})" if "deleted" in r else
        f"{r['host']}: not deleted: {r['error']}" for r in results))
    return 1 if failed else 0


def render_catalog(entries: list, broken: list) -> str:
    rows = [("MODEL", "DIGEST", "SIZE", "SHAPE", "HOSTS", "PARTLY")]
    for e in entries:
        shape = "-" if e.info is None else f"{e.info.architecture} {e.info.num_hidden_layers} layers" + (
            f" {e.info.dtype}" if e.info.dtype else "")
        rows.append((e.name + (" (!)" if e.conflict else ""), e.digest[:19], _size(e.size), shape,
                     ",".join(e.holders) or "-", ",".join(e.partial) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for e in entries:
        if e.conflict:
            lines.append(f"(!) {e.name}@{e.digest}: {e.conflict}; deploy it as NAME@sha256:DIGEST")
    for b in broken:
        lines.append(f"broken: {b.name} on {b.host} ({b.path}): {b.reason}")
    return "\n".join(lines)


def _size(n: int) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"


def render(m: ModelInfo) -> str:
    """The human summary: one fact per line, the layers compressed into runs of equal size."""
    q = m.quantization
    quant = "none" if q is None else f"{q.method}" + (f", {q.bits}-bit" if q.bits else "") + (
        f", group {q.group_size}" if q.group_size else "")
    kv = m.kv_cache
    kv_text = f"{kv.kind}, {kv.k_elements} K + {kv.v_elements} V elements per token per layer"
    if kv.kind == "mla":
        kv_text += f" (kv_lora_rank {kv.kv_lora_rank} + rope {kv.qk_rope_head_dim})"
    kv_text += f"; {_size(kv.bytes_per_token(m.num_hidden_layers) * 1000)} per 1000 tokens at fp16"
    rows = [
        ("name", m.name or "-"),
        ("format", m.format),
        ("architecture", m.architecture),
        ("layers", str(m.num_hidden_layers)),
        ("heads / kv heads", f"{m.num_attention_heads} / {m.num_key_value_heads}"),
        ("hidden / head dim", f"{m.hidden_size} / {m.head_dim}"),
        ("intermediate", str(m.intermediate_size) if m.intermediate_size else "-"),
        ("vocab", str(m.vocab_size)),
        ("context", str(m.context_length)),
        ("dtype", m.dtype or "-"),
        ("quantization", quant),
        ("weights", _size(m.total_weight_bytes)),
        ("layers bytes", _layer_runs(m.layer_bytes)),
        ("non-repeating", ", ".join(f"{k} {_size(v)}" for k, v in m.non_repeating_bytes.items() if v) or "-"),
        ("kv cache", kv_text),
    ]
    if m.moe:
        rows.append(("moe", f"{m.moe.num_experts} experts, {m.moe.experts_per_token} per token, "
                            f"{m.moe.shared_experts} shared"))
    if m.vision:
        v = m.vision
        rows.append(("vision", f"{v.architecture or '?'}: {v.num_hidden_layers or '?'} layers, hidden "
                               f"{v.hidden_size or '?'}" + (f", {_size(v.weight_bytes)}" if v.weight_bytes else "")))
    source = m.extra.get("weight_bytes_source")
    if source:
        rows.append(("sizes from", str(source)))
    if m.extra.get("header_only"):
        rows.append(("note", "header-only file: tensor data absent"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    shown = list(m.files[:3]) + ([f"... and {len(m.files) - 4} more, last {m.files[-1]}"] if len(m.files) > 4
                                  else list(m.files[3:]))
    lines.append(f"{'files'.ljust(width)}  {shown[0] if shown else '-'}")
    lines += [f"{''.ljust(width)}  {f}" for f in shown[1:]]
    return "\n".join(lines)


def _layer_runs(sizes: tuple[int, ...]) -> str:
    """'0-2: 11.20 GiB each, 3-60: 21.83 GiB each' rather than 61 numbers."""
    if not sizes:
        return "-"
    runs: list[tuple[int, int, int]] = []
    for i, n in enumerate(sizes):
        if runs and runs[-1][2] == n:
            runs[-1] = (runs[-1][0], i, n)
        else:
            runs.append((i, i, n))
    parts = [f"{a}-{b}: {_size(n)} each" if a != b else f"{a}: {_size(n)}" for a, b, n in runs[:6]]
    if len(runs) > 6:
        parts.append(f"... ({len(runs) - 6} more runs)")
    return ", ".join(parts)
