"""How busy a llama-server is, for the /v1/ proxy's routing: its `/slots` (issue 21 item 3).

`/slots` lists the server's slots (one per `--parallel` sequence) with
`is_processing`; busy is the number processing, capacity the number of slots.
"""

from __future__ import annotations

import json

from agentd.plugins.api import hookimpl

NAME = "llamabox"


@hookimpl
def agentd_load_path(runtime):
    return "/slots" if runtime == NAME else None


@hookimpl
def agentd_read_load(runtime, status, body):
    if runtime != NAME or status != 200:
        return None
    try:
        slots = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(slots, list) or not slots or not all(isinstance(s, dict) for s in slots):
        return None
    return sum(1 for s in slots if s.get("is_processing")), len(slots)
