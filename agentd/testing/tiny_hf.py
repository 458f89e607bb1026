"""A tiny random Llama in Hugging Face format that vLLM's CPU build serves (RUNTIMES.md's recipe).

For tests of the vllm tiers. The script runs in `.venv-vllm`'s Python (torch, transformers,
tokenizers), never in agentd's; it is kept here so that test modules share it without
importing each other.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

# hidden 128, 2 layers, 2 heads of head_dim 64 (the CPU attention backend takes 32, 64, 80, ... only),
# a WordLevel tokenizer of 256 words "w0".."w252" plus specials.
TINY_LLAMA = r"""
import sys
from pathlib import Path
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
out = Path(sys.argv[1])
words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(253)]
tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(out)
cfg = LlamaConfig(vocab_size=len(words), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
LlamaForCausalLM(cfg).save_pretrained(out)
"""

# What `vllm serve` needs here: no hub, no telemetry, 1 GiB of KV cache on the CPU platform.
SERVE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def write_tiny_llama(python: Path, out: Path, timeout: float = 300) -> Path:
    """Write the model with `python` (the vLLM venv's interpreter); raise with its stderr if it fails."""
    gen = subprocess.run([str(python), "-c", TINY_LLAMA, str(out)], capture_output=True, text=True, timeout=timeout)
    if gen.returncode != 0:
        raise RuntimeError(f"writing the tiny model failed: {gen.stderr[-2000:]}")
    return out
