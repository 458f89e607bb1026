"""Values shared by every layer: inventories, model facts, deployment specs and plans.

All sizes are in bytes. Every value is a frozen pydantic model so it can be
hashed, compared, serialised to the JSON formats of DESIGN.md §5 and passed
between layers without anyone mutating it behind another's back.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GiB = 1024**3
MiB = 1024**2


class Value(BaseModel):
    """Base for value objects: frozen, and strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# Fields added after the first release: left out of the JSON while they hold their default, so agents of
# the previous release (extra="forbid") still read what this one writes; `since_format` is the state/wire
# format that first has them (agentd/formats.py).
_SINCE_2: dict[str, Any] = {"since_format": 2}


def _empty(value: Any) -> bool:
    return not value


# --------------------------------------------------------------------------- inventory


class GpuProcess(Value):
    """A process holding memory on a GPU. `owned` marks processes agentd launched."""

    pid: int
    memory_used: int = 0
    name: str = ""
    owned: bool = False


class GpuInfo(Value):
    index: int = Field(ge=0)
    uuid: str
    name: str = ""
    vendor: str = "nvidia"
    memory_total: int = Field(ge=0)
    memory_used: int = Field(ge=0)
    utilization: float = 0.0
    compute_capability: str = ""
    pci_bus_id: str = ""
    processes: tuple[GpuProcess, ...] = ()
    # A MIG instance is reported as its own device; `parent_uuid` names the physical GPU.
    mig: bool = False
    parent_uuid: str = ""
    simulated: bool = False
    # `agentd cordon HOST:INDEX` (docs/operations.md): no new parts here. Set by the coordinator from the
    # replicated state when it plans, or in a cluster file for `agentd plan`; never reported by a host.
    cordoned: bool = Field(default=False, exclude_if=_empty, json_schema_extra=_SINCE_2)

    @property
    def memory_free(self) -> int:
        return max(0, self.memory_total - self.memory_used)


GpuLinkKind = Literal["nvlink", "pcie", "unknown"]


class GpuLink(Value):
    """How two GPUs of a host talk to each other: NVLink (direct or through NVSwitch), only PCIe, or unknown.

    `nvlinks` counts the NVLink links between them (through NVSwitch: the fewer of the two GPUs' switch
    links), `path` names the closest PCIe ancestor the way `nvidia-smi topo -m` does (PIX, PXB, PHB,
    NODE, SYS). Placement's vLLM policy runs tensor parallel over NVLink and pipeline stages over PCIe.
    """

    gpus: tuple[int, int]  # GPU indices, the lower first
    link: GpuLinkKind
    nvlinks: int = Field(default=0, ge=0, exclude_if=_empty)
    path: str = Field(default="", exclude_if=_empty)

    @field_validator("gpus")
    @classmethod
    def _two_gpus(cls, gpus: tuple[int, int]) -> tuple[int, int]:
        a, b = gpus
        if a == b or a < 0 or b < 0:
            raise ValueError(f"a link joins two different GPU indices, got {list(gpus)}")
        return (a, b) if a < b else (b, a)


class ModelFile(Value):
    """One file of a model a host holds: its name relative to the model (a GGUF shard's file name, a path
    inside a Hugging Face directory), its size and its sha256 (hex; "" until the host has hashed it)."""

    name: str
    size: int = Field(default=0, ge=0)
    sha256: str = Field(default="", exclude_if=_empty)


class HeldModel(Value):
    """A model in one of a host's model directories, as the host reports it (docs/models.md).

    The cluster's catalog is keyed by `digest`: the file's sha256 for a single file, else the sha256 of
    the manifest (each file's name, size and sha256), "sha256:<hex>"; "" while the host is still hashing.
    `path` is where it lies on that host (the .gguf, the first shard, or the directory). `broken` says why
    the host cannot use it (a bad config.json, a truncated GGUF); `complete` is False for a partial copy.
    """

    name: str
    digest: str = Field(default="", exclude_if=_empty)
    path: str
    format: Literal["gguf", "hf"] = "gguf"
    size: int = Field(default=0, ge=0)
    files: tuple[ModelFile, ...] = ()
    complete: bool = True
    broken: str = Field(default="", exclude_if=_empty)
    info: ModelInfo | None = Field(default=None, exclude_if=lambda v: v is None)
    # From a Hugging Face hub cache: the snapshot's commit and the refs (branches, tags) that point at it.
    revision: str = Field(default="", exclude_if=_empty)
    refs: tuple[str, ...] = Field(default=(), exclude_if=_empty)

    @property
    def usable(self) -> bool:
        return self.complete and not self.broken and bool(self.digest) and self.info is not None


class HostInventory(Value):
    """One host, as `agentd inventory --json` prints it and as a cluster file lists it."""

    name: str
    address: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    cpu_count: int = Field(default=1, ge=0)
    memory_total: int = Field(default=0, ge=0)
    memory_available: int = Field(default=0, ge=0)
    load_average: float | None = None
    gpus: tuple[GpuInfo, ...] = ()
    simulated: bool = False
    warnings: tuple[str, ...] = ()
    # GPU pairs and their interconnect (NVML topology); a pair not listed is unknown.
    gpu_links: tuple[GpuLink, ...] = Field(default=(), exclude_if=_empty, json_schema_extra=_SINCE_2)
    # `agentd cordon HOST` (docs/operations.md): why the host takes no new parts ("" when it does); set like
    # GpuInfo.cordoned.
    cordoned: str = Field(default="", exclude_if=_empty, json_schema_extra=_SINCE_2)
    # Ports in this host's port ranges (model servers, Ray) that processes agentd did not start listen on:
    # the coordinator assigns none of them (docs/runtime.md, "Ports taken by someone else").
    foreign_ports: tuple[int, ...] = Field(default=(), exclude_if=_empty, json_schema_extra=_SINCE_2)
    # The models in this host's model directories (docs/models.md), the directories themselves, and the
    # bytes free where a fetched copy would go (the first directory); None when unknown.
    models: tuple[HeldModel, ...] = Field(default=(), exclude_if=_empty, json_schema_extra=_SINCE_2)
    model_dirs: tuple[str, ...] = Field(default=(), exclude_if=_empty, json_schema_extra=_SINCE_2)
    model_disk_free: int | None = Field(default=None, exclude_if=lambda v: v is None, json_schema_extra=_SINCE_2)
    # The runtimes whose programs this host has, name -> version ("" when unknown; plugin hook agentd_installed).
    # Empty (an older agent, a cluster file): the host is taken to run every runtime.
    runtimes: dict[str, str] = Field(default_factory=dict, exclude_if=_empty, json_schema_extra=_SINCE_2)
    # The host CPU's feature flags that some runtime's memory depends on (agentd.inventory.host.CPU_FEATURES, as
    # /proc/cpuinfo names them: "amx_int8", ...), sorted. Empty: none of them, or unknown (not Linux, an older agent).
    cpu_features: tuple[str, ...] = Field(default=(), exclude_if=_empty, json_schema_extra=_SINCE_2)

    @field_validator("cpu_features")
    @classmethod
    def _sorted_cpu_features(cls, flags: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(set(flags)))

    @field_validator("gpus")
    @classmethod
    def _unique_gpu_indices(cls, gpus: tuple[GpuInfo, ...]) -> tuple[GpuInfo, ...]:
        seen = set()
        for g in gpus:
            if g.index in seen:
                raise ValueError(f"duplicate GPU index {g.index}")
            seen.add(g.index)
        return gpus


class ClusterInventory(Value):
    """A cluster file: `{"hosts": [<host inventory>, ...]}`."""

    hosts: tuple[HostInventory, ...] = ()

    @field_validator("hosts")
    @classmethod
    def _unique_host_names(cls, hosts: tuple[HostInventory, ...]) -> tuple[HostInventory, ...]:
        names = [h.name for h in hosts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate host name(s): {', '.join(dupes)}")
        return hosts


def held_copy(models: tuple[HeldModel, ...] | list[HeldModel], model: str) -> HeldModel | None:
    """The usable copy of `model` among a host's models: `NAME@sha256:DIGEST` by digest, or an absolute path
    (as earlier releases deployed) by where the host has it."""
    name, _, digest = model.partition("@")
    for m in models:
        if not m.usable:
            continue
        if digest and m.digest == digest:
            return m
        if not digest and name.startswith("/") and m.path == name.rstrip("/"):
            return m
    return None


# --------------------------------------------------------------------------- model facts


class Quantization(Value):
    """How the weights are stored, when they are not plain fp16/bf16/fp32."""

    method: str  # gptq | awq | fp8 | compressed-tensors | gguf:<file type> | ...
    bits: int | None = None
    group_size: int | None = None


class MoE(Value):
    num_experts: int
    experts_per_token: int
    shared_experts: int = 0


class KVCache(Value):
    """The KV-cache shape that actually applies, per token and per layer.

    For ordinary multi-head / grouped-query attention both K and V hold
    `num_key_value_heads * head_dim` elements. For MLA (DeepSeek V2/V3/R1) the
    cache holds the compressed latent (`kv_lora_rank`) plus the decoupled RoPE
    key (`qk_rope_head_dim`) and no separate V.
    """

    kind: Literal["mha", "gqa", "mqa", "mla"] = "gqa"
    k_elements: int  # per token per layer
    v_elements: int  # per token per layer
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None

    def bytes_per_token(self, num_layers: int, element_bytes: float = 2.0) -> int:
        return int((self.k_elements + self.v_elements) * element_bytes * num_layers)


class VisionTower(Value):
    """The non-language part of a multimodal model, reported beside the text model."""

    architecture: str = ""
    num_hidden_layers: int | None = None
    hidden_size: int | None = None
    weight_bytes: int | None = None


class ModelInfo(Value):
    """Everything placement needs to know about a model, read from headers only."""

    format: Literal["gguf", "safetensors"]
    architecture: str
    name: str = ""
    num_hidden_layers: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    intermediate_size: int | None = None
    vocab_size: int = Field(ge=1)
    context_length: int = Field(ge=1)
    dtype: str = ""  # torch_dtype for HF ("bfloat16"), file type for GGUF ("Q4_K_M")
    quantization: Quantization | None = None
    total_weight_bytes: int = Field(ge=0)
    # Bytes per repeating layer (blk.N.* for GGUF), index = layer number. For HF
    # directories this is derived from the tensor names when headers allow it,
    # otherwise spread evenly over the layers.
    layer_bytes: tuple[int, ...] = ()
    # Non-repeating tensors by role: token_embd, output, output_norm, other.
    non_repeating_bytes: dict[str, int] = Field(default_factory=dict)
    kv_cache: KVCache
    moe: MoE | None = None
    vision: VisionTower | None = None
    files: tuple[str, ...] = ()
    # Raw metadata useful to plugins (GGUF keys or config.json keys), kept small.
    extra: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- deployments

CATALOG_NAME_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._/+-]{0,199})(@(?P<digest>sha256:[0-9a-f]{64}))?$")
HF_REF_RE = re.compile(
    r"^hf:(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(@(?P<rev>[A-Za-z0-9._/-]+))?"
    r"(:(?P<pattern>[A-Za-z0-9._*?/-]+))?$")


class ModelRef(Value):
    """What `--model` names (docs/models.md): an absolute path on the hosts, a Hugging Face name, or a name in
    the cluster's catalog, optionally pinned to one content digest."""

    kind: Literal["path", "hf", "catalog"]
    name: str  # the path, ORG/NAME, or the catalog name
    digest: str = ""  # "sha256:<hex>" when the catalog name pins one
    revision: str = ""  # hf: only
    # hf: only, for a GGUF repository: which of its GGUF files (a glob, or a part of the name such as a
    # quantization, "Q4_K_M"), matched case-insensitively against the file's name without ".gguf".
    pattern: str = Field(default="", exclude_if=_empty, json_schema_extra=_SINCE_2)

    @property
    def text(self) -> str:
        if self.kind == "hf":
            return (f"hf:{self.name}" + (f"@{self.revision}" if self.revision else "")
                    + (f":{self.pattern}" if self.pattern else ""))
        return self.name + (f"@{self.digest}" if self.digest else "")


def parse_model_ref(model: str) -> ModelRef:
    """`--model`'s value as a ModelRef; ValueError, saying what is accepted, for anything else.

    Relative paths are refused: they would resolve against whichever agent reads them, and a name that
    happens to exist in the caller's directory must not silently become a path.
    """
    text = model.strip()
    if text.startswith("/"):
        return ModelRef(kind="path", name=text)
    if text.startswith("hf:"):
        m = HF_REF_RE.fullmatch(text)
        if m is None:
            raise ValueError(f"{model!r} is not hf:ORG/NAME[@REVISION][:GGUF-FILE-PATTERN]")
        return ModelRef(kind="hf", name=m["name"], revision=m["rev"] or "", pattern=m["pattern"] or "")
    m = CATALOG_NAME_RE.fullmatch(text)
    relative = text.startswith((".", "~")) or text.lower().endswith((".gguf", ".json", ".safetensors"))
    if m is None or relative or "//" in text or "/../" in f"/{text}/" or "/./" in f"/{text}/":
        raise ValueError(f"{model!r} is neither an absolute path, hf:ORG/NAME[@REVISION] nor a catalog name "
                         "NAME[@sha256:DIGEST] (`agentd model ls` lists them); relative paths are refused, "
                         "give the absolute path")
    return ModelRef(kind="catalog", name=m["name"], digest=m["digest"] or "")


NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class GpuPin(Value):
    """Pin a replica to a named host and, optionally, to GPU indices on it."""

    host: str
    gpus: tuple[int, ...] = ()


class RuntimeOptions(Value):
    gpu_memory_utilization: float | None = Field(default=None, gt=0.0, le=1.0)
    ctx_size: int | None = Field(default=None, ge=1)  # llama.cpp --ctx-size / vLLM --max-model-len
    allow_cpu_offload: bool = False
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)


class DeploymentSpec(Value):
    """The desired state of one deployment, as a user asks for it."""

    name: str
    model: str
    runtime: str
    replicas: int = Field(default=1, ge=0)
    strategy: Literal["binpack", "spread"] = "binpack"
    selector: dict[str, str] = Field(default_factory=dict)
    pin: tuple[GpuPin, ...] = ()
    exclude_gpus: tuple[str, ...] = ()  # GPU UUIDs taken out for maintenance
    options: RuntimeOptions = Field(default_factory=RuntimeOptions)
    # Who may call it on /v1/: API keys of this tenant (and admin keys). See docs/security.md.
    tenant: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    # How a sharded runtime (vLLM) splits a model that needs several GPUs: `auto` tensor parallel over
    # NVLink and pipeline stages over PCIe or across hosts, `latency` the largest usable TP, `gpus` the
    # fewest GPUs (docs/placement.md, "Candidate order").
    parallelism: Literal["auto", "latency", "gpus"] = Field(
        default="auto", exclude_if=lambda v: v == "auto", json_schema_extra=_SINCE_2)
    # Seconds without a request (at any agent's /v1/) after which the deployment's replicas stop and it waits
    # IDLE for the next request to place it again (docs/on-demand.md); 0: never.
    idle_unload: float = Field(default=0.0, ge=0.0, le=366 * 86400.0, allow_inf_nan=False,
                               exclude_if=lambda v: v == 0, json_schema_extra=_SINCE_2)
    # Replicas by load (docs/on-demand.md, "Replicas by load"): with max_replicas > 0 the coordinator keeps
    # between min_replicas and max_replicas replicas, adding one while the average queue per replica (requests
    # outstanding at the proxies or queued in the model server) stays above target_queue. min_replicas 0 is
    # the idle unload: it needs idle_unload (how long without a request before the last replica goes).
    min_replicas: int = Field(default=1, ge=0, le=10_000, exclude_if=lambda v: v == 1, json_schema_extra=_SINCE_2)
    max_replicas: int = Field(default=0, ge=0, le=10_000, exclude_if=lambda v: v == 0, json_schema_extra=_SINCE_2)
    target_queue: float = Field(default=0.0, ge=0.0, le=1e6, allow_inf_nan=False,
                                exclude_if=lambda v: v == 0, json_schema_extra=_SINCE_2)

    @property
    def autoscaled(self) -> bool:
        return self.max_replicas > 0

    @model_validator(mode="after")
    def _autoscale_bounds(self) -> DeploymentSpec:
        if not self.autoscaled:
            if self.min_replicas != 1 or self.target_queue:
                raise ValueError("min_replicas and target_queue need max_replicas (replicas by load: "
                                 "--min-replicas N --max-replicas M --target-queue Q)")
            return self
        if self.target_queue <= 0:
            raise ValueError("max_replicas needs target_queue > 0 (requests queued per replica to aim for)")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")
        if self.min_replicas == 0 and self.idle_unload <= 0:
            raise ValueError("min_replicas 0 needs idle_unload (how long without a request before the last "
                             "replica stops), e.g. --idle-unload 15m")
        if self.idle_unload > 0 and self.min_replicas != 0:
            raise ValueError("idle_unload stops the last replica, so it means min_replicas 0: "
                             "pass --min-replicas 0 with it, or drop --idle-unload")
        return self

    @field_validator("name")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(
                "must be a DNS label: lowercase letters, digits and '-', 1-63 characters, "
                "starting and ending with a letter or digit"
            )
        return v

    @field_validator("model", "runtime")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


# --------------------------------------------------------------------------- plans


class Part(Value):
    """One host's share of a replica."""

    host: str
    gpus: tuple[int, ...] = ()
    role: Literal["main", "worker", "rpc"]
    layers: int = 0  # model layers this part holds on GPUs
    cpu_layers: int | None = None  # llamabox main only: layers left in host RAM
    memory: tuple[int, ...] = ()  # bytes planned on each of `gpus`, same order
    env: dict[str, str] = Field(default_factory=dict)  # e.g. CUDA_VISIBLE_DEVICES
    # Model layers held by each of `gpus`, same order (llamabox: the --tensor-split counts of this part).
    layer_split: tuple[int, ...] = ()
    # Bytes of the host's RAM this part holds (a llama.cpp main on a host without GPUs, an rpc-server
    # serving such a host's RAM): placement subtracts them from the host's RAM for later deployments.
    ram: int = Field(default=0, ge=0, exclude_if=_empty, json_schema_extra=_SINCE_2)


class ReplicaPlan(Value):
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    parts: tuple[Part, ...]
    args: tuple[str, ...] = ()  # launch arguments for the main process
    score: float = 0.0
    # Why the runtime chose this layout over the runner-up (agentd_explain). Shown by `agentd plan` and the
    # deploy reply; the coordinator leaves it out of the committed assignment.
    why: str = Field(default="", exclude_if=_empty, json_schema_extra=_SINCE_2)


class Reason(Value):
    """One stable reason text, how many hosts/GPUs/layouts hit it, and its numbers."""

    reason: str
    count: int = 1
    details: dict[str, Any] = Field(default_factory=dict)


class Diagnosis(Value):
    message: str
    reasons: tuple[Reason, ...] = ()
    near_miss: str | None = None
    suggestions: tuple[str, ...] = ()


class Plan(Value):
    placed: bool
    runtime: str
    replicas: tuple[ReplicaPlan, ...] = ()
    diagnosis: Diagnosis | None = None


# --------------------------------------------------------------------------- assignments


class PartEndpoint(Value):
    """Where one part of a replica listens: chosen by the coordinator, checked free by the agent."""

    host: str
    address: str  # the host's address as peers reach it, without port (e.g. "10.0.0.3" or "127.0.0.1")
    port: int = Field(ge=1, le=65535)


class Assignment(Value):
    """One replica's placement, committed to the Raft log by the coordinator.

    `term` is the Raft term of the leader that made it: agents reject an
    assignment (or a stop command) stamped with a term older than the newest
    they have seen (fencing). `generation` grows each time the replica is
    re-placed, so an instance id names one incarnation and an agent can tell
    "same replica, new layout" from "unchanged".
    """

    deployment: str
    replica: int = Field(ge=0)
    generation: int = Field(default=1, ge=1)
    term: int = Field(ge=0)
    model: str
    runtime: str
    options: RuntimeOptions = Field(default_factory=RuntimeOptions)
    plan: ReplicaPlan
    endpoints: tuple[PartEndpoint, ...]  # one per plan.parts entry, same order
    # The model server's own API key (docs/security.md): each agent derives it from the cluster secret and the
    # instance id when it hands the assignment to its supervisor or proxy. Never serialised: it is not in the
    # Raft log, the process records or Control replies.
    api_key: str = Field(default="", exclude=True, repr=False)

    @property
    def instance_id(self) -> str:
        return f"{self.deployment}-r{self.replica}-g{self.generation}"

    def parts_on(self, host: str) -> list[int]:
        """Indices of the parts this host must run."""
        return [i for i, p in enumerate(self.plan.parts) if p.host == host]
