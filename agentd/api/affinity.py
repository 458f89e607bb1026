"""Prefix affinity for the /v1/ proxy: requests that share a long prompt prefix go to the replica that saw it.

A model server keeps the key/value cache of the prompts it just processed
(llama-server per slot, vLLM and SGLang across requests); a request that
starts with the same text skips that part of the prefill. A multi-turn chat
resends the whole conversation each turn, and many requests share one system
prompt, so sending them to the same replica turns most of each prompt into a
cache hit, where round-robin or least-busy routing spreads them and every
replica recomputes them.

The prompt's text (chat messages as role and content, or a completion's
prompt) is cut into blocks of `block` characters, up to `limit` characters,
and each whole block's running hash (of everything up to its end) is a key.
The table maps (model, key) to the replica that last served a request with
that prefix, least recently used first out, at most `entries` keys. A request
is looked up by its longest key in the table, so turn 5 of a chat finds turn 4's
replica by the prefix they share, however the conversation grew. Prompts under
one block get no key: there is little to reuse.

This only says which replica it would like; the proxy keeps it only while that
replica is not overloaded (`OpenAIProxy`), and records where the request went.
State is per agent and per process, like the balancer's.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

BLOCK = 256  # characters per key: about 64 tokens of English
LIMIT = 16384  # characters of the prompt looked at
ENTRIES = 16384  # keys kept per agent (about 1.5 MiB)


def prompt_text(payload: Mapping[str, Any], limit: int = LIMIT) -> str:
    """The start of what the model server will put first in its prompt, as text; "" when there is nothing to key
    (embeddings, a prompt of token ids). Only the first `limit` characters are built."""
    parts: list[str] = []
    size = 0
    for piece in _pieces(payload):
        parts.append(piece)
        size += len(piece)
        if size >= limit:
            break
    return "".join(parts)[:limit]


def _pieces(payload: Mapping[str, Any]) -> Iterator[str]:
    messages = payload.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if not isinstance(m, dict):
                continue
            yield f"{m.get('role', '')}\x1f"
            content = m.get("content")
            if isinstance(content, str):
                yield content
            elif isinstance(content, list):  # parts: text, images, ...
                for part in content:
                    text = part.get("text") if isinstance(part, dict) else None
                    yield text if isinstance(text, str) else json.dumps(part, sort_keys=True)
            elif content is not None:
                yield json.dumps(content, sort_keys=True)
            yield "\x1e"
        return
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        yield prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        yield prompt[0]  # a batch of prompts: the first one decides


def prefix_keys(text: str, block: int = BLOCK) -> list[bytes]:
    """The running hash at the end of each whole block of `text`, shortest prefix first."""
    h = hashlib.blake2b(digest_size=8)
    keys = []
    # Blocks are cut on characters, then hashed as UTF-8: the same text always gives the same keys.
    for start in range(0, len(text) - block + 1, block):
        h.update(text[start:start + block].encode("utf-8", "surrogatepass"))
        keys.append(h.digest())
    return keys


class PrefixTable:
    """(model, prefix key) -> instance id, bounded, least recently used out first."""

    def __init__(self, entries: int = ENTRIES, block: int = BLOCK, limit: int = LIMIT):
        if entries < 1 or block < 1 or limit < block:
            raise ValueError("entries and block must be positive, and limit at least one block")
        self.entries = entries
        self.block = block
        self.limit = limit
        self._table: OrderedDict[tuple[str, bytes], str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def keys(self, payload: Mapping[str, Any]) -> list[bytes]:
        return prefix_keys(prompt_text(payload, self.limit), self.block)

    def lookup(self, model: str, keys: Sequence[bytes]) -> str | None:
        """The replica that served the longest of these prefixes most recently, or None."""
        for key in reversed(keys):
            got = self._table.get((model, key))
            if got is not None:
                self._table.move_to_end((model, key))
                return got
        return None

    def record(self, model: str, keys: Sequence[bytes], instance_id: str) -> None:
        for key in keys:
            self._table[(model, key)] = instance_id
            self._table.move_to_end((model, key))
        while len(self._table) > self.entries:
            self._table.popitem(last=False)
