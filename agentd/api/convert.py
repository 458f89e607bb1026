"""Conversions between the gRPC messages and agentd's value types.

Validation happens here, once, at the edge: a request that does not make a
valid DeploymentSpec becomes InvalidInput with the field named, which the
servicer maps to INVALID_ARGUMENT.
"""

from __future__ import annotations

from pydantic import ValidationError

from agentd.errors import InvalidInput, validation_message
from agentd.types import DeploymentSpec
from agentd.v1 import control_pb2 as pb


def spec_from_pb(msg: pb.DeploymentSpec) -> DeploymentSpec:
    """Validated as one document, so an error names its full path ("options.ctx_size", "pin.0.host")."""
    opts = msg.options
    try:
        return DeploymentSpec.model_validate({
            "name": msg.name,
            "model": msg.model,
            "runtime": msg.runtime,
            "replicas": msg.replicas,
            "strategy": msg.strategy or "binpack",
            "selector": dict(msg.selector),
            "pin": [{"host": p.host, "gpus": list(p.gpus)} for p in msg.pin],
            "exclude_gpus": list(msg.exclude_gpus),
            "tenant": msg.tenant or "default",
            "parallelism": msg.parallelism or "auto",
            "idle_unload": msg.idle_unload,
            "min_replicas": msg.min_replicas if msg.HasField("min_replicas") else 1,
            "max_replicas": msg.max_replicas,
            "target_queue": msg.target_queue,
            "options": {
                "gpu_memory_utilization": (
                    opts.gpu_memory_utilization if opts.HasField("gpu_memory_utilization") else None
                ),
                "ctx_size": opts.ctx_size if opts.HasField("ctx_size") else None,
                "allow_cpu_offload": opts.allow_cpu_offload,
                "extra_args": list(opts.extra_args),
                "env": dict(opts.env),
            },
        })
    except ValidationError as exc:
        raise InvalidInput(validation_message(exc), where="deployment spec") from None


def spec_to_pb(spec: DeploymentSpec) -> pb.DeploymentSpec:
    o = spec.options
    options = pb.RuntimeOptions(allow_cpu_offload=o.allow_cpu_offload, extra_args=list(o.extra_args), env=o.env)
    if o.gpu_memory_utilization is not None:
        options.gpu_memory_utilization = o.gpu_memory_utilization
    if o.ctx_size is not None:
        options.ctx_size = o.ctx_size
    return pb.DeploymentSpec(
        name=spec.name, model=spec.model, runtime=spec.runtime, replicas=spec.replicas, strategy=spec.strategy,
        selector=spec.selector, pin=[pb.GpuPin(host=p.host, gpus=list(p.gpus)) for p in spec.pin],
        exclude_gpus=list(spec.exclude_gpus), options=options, tenant=spec.tenant,
        parallelism="" if spec.parallelism == "auto" else spec.parallelism,  # empty on the wire means auto
        idle_unload=spec.idle_unload, max_replicas=spec.max_replicas, target_queue=spec.target_queue,
        **({"min_replicas": spec.min_replicas} if spec.min_replicas != 1 else {}),
    )


__all__ = ["spec_from_pb", "spec_to_pb", "validation_message"]
