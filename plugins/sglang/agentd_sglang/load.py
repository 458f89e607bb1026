"""How busy an SGLang server is, for the /v1/ proxy's routing: its `/v1/loads` (issue 21 item 3).

SGLang's own load endpoint (`sglang/srt/entrypoints/v1_loads.py`, always on,
no flag) answers per data-parallel rank with `num_running_reqs`,
`num_waiting_reqs` and `max_running_requests` (the scheduler's batch limit),
taken from the scheduler's load snapshot. Its Prometheus `/metrics` would need
`--enable-metrics` and has no batch limit, so this one is used. Ranks are
added up: busy = running, capacity = the limits, waiting = queued.
"""

from __future__ import annotations

import json

from agentd.plugins.api import hookimpl

NAME = "sglang"
PATH = "/v1/loads?include=core"


@hookimpl
def agentd_load_path(runtime):
    return PATH if runtime == NAME else None


@hookimpl
def agentd_read_load(runtime, status, body):
    if runtime != NAME or status != 200:
        return None
    try:
        ranks = json.loads(body).get("loads")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    if not isinstance(ranks, list) or not ranks or not all(isinstance(r, dict) for r in ranks):
        return None
    try:
        return tuple(sum(int(r.get(k) or 0) for r in ranks)
                     for k in ("num_running_reqs", "max_running_requests", "num_waiting_reqs"))
    except (TypeError, ValueError):
        return None
