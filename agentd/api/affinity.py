"""Prefix affinity for the /v1/ proxy: requests that share a long prompt prefix go to the replica that saw it.

A model server keeps the key/value cache of the prompts it just processed
(llama-server per slot, vLLM and SGLang across requests); a request that
starts with the same text skips that part of the prefill. A multi-turn chat
resends the whole conversation each turn, and many requests share one system
prompt, so sending them to the same replica turns most of each prompt into a
cache hit, where round-robin or least-busy routing spreads them and every
replica recomputes them.

The prompt's text (chat messages as role and content, or a completion's
prompt), up to `limit` characters, is hashed as one stream, and the running
hash is taken as a key at the end of every message and every `block`
characters. A running hash depends only on the text before it, so a key is
shared by exactly the requests that share that much text: turn 5 of a chat
has every message end of turn 4 among its keys, whatever it added, and chats
with one system prompt share the key at its end. The table maps (model, key)
to the replica that last served a request with that prefix, least recently
used out first, at most `entries` keys. A request is looked up by its longest
key in the table. Prompts under `block` characters get no key: there is little
to reuse.

This only says which replica it would like; the proxy keeps it only while that
replica is not overloaded (`OpenAIProxy`), and records where the request went.
State is per agent and per process, like the balancer's.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

BLOCK = 256  # characters per key: about 64 tokens of English
LIMIT = 16384  # characters of the prompt looked at
ENTRIES = 16384  # keys kept per agent (about 1.5 MiB)
# Kept only while the replica runs at most this many more requests than the least busy one: a request that moves
# recomputes its prompt, but a pile-up on one replica while another idles costs every request on it.
SLACK = 2


def prompt_text(payload: Mapping[str, Any], limit: int = LIMIT) -> str:
    """The start of what the model server will put first in its prompt, as text; "" when there is nothing to key
    (embeddings, a prompt of token ids). Only the first `limit` characters are built."""
    return "".join(_pieces(payload))[:limit]


def _pieces(payload: Mapping[str, Any]) -> list[str]:
    """The prompt as pieces: one per chat message (ending with a separator, so message ends are key positions),
    or the completion's prompt."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        out = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):  # parts: text, images, ...
                text = "".join(p["text"] if isinstance(p, dict) and isinstance(p.get("text"), str)
                               else json.dumps(p, sort_keys=True) for p in content)
            elif isinstance(content, str):
                text = content
            else:
                text = "" if content is None else json.dumps(content, sort_keys=True)
            out.append(f"{m.get('role', '')}\x1f{text}\x1e")
        return out
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [prompt[0]]  # a batch of prompts: the first one decides
    return []


def prefix_keys(pieces: Sequence[str], block: int = BLOCK, limit: int = LIMIT) -> list[bytes]:
    """The running hash of the pieces' text at every `block` characters and at the end of every piece (up to
    `limit` characters), shortest prefix first; none for a text under one block."""
    text = "".join(pieces)[:limit]
    if len(text) < block:
        return []
    cuts = set(range(block, len(text) + 1, block))
    end = 0
    for piece in pieces:
        end += len(piece)
        if end > len(text):
            break
        cuts.add(end)
    h = hashlib.blake2b(digest_size=8)
    keys = []
    at = 0
    # Cut on characters, hashed as UTF-8: the same text always gives the same keys.
    for cut in sorted(cuts):
        h.update(text[at:cut].encode("utf-8", "surrogatepass"))
        keys.append(h.digest())
        at = cut
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
        return prefix_keys(_pieces(payload), self.block, self.limit)

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
