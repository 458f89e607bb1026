"""How busy a vLLM server is, for the /v1/ proxy's routing: its Prometheus `/metrics` (issue 21 item 3).

vLLM exports `vllm:num_requests_running` (requests in the running batches) and
`vllm:num_requests_waiting` (requests queued for want of batch slots or KV
cache), one series per engine (label `engine`; several with data parallel),
which we add up. It does not export how many sequences it batches at most, so
capacity is 0 ("unknown"): the proxy calls a vLLM replica full by what waits.

The page is long (histograms of every latency); only the lines of these two
metrics, and their # TYPE/# HELP lines, go through prometheus_client's text
parser, so a poll costs little however many series vLLM adds.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from agentd.plugins.api import hookimpl

NAME = "vllm"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"


@hookimpl
def agentd_load_path(runtime):
    return "/metrics" if runtime == NAME else None


@hookimpl
def agentd_read_load(runtime, status, body):
    if runtime != NAME or status != 200:
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    got = gauges(text, (RUNNING, WAITING))
    if RUNNING not in got or WAITING not in got:
        return None
    return int(got[RUNNING]), 0, int(got[WAITING])


def gauges(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """The sum over all series of each of `names` found in a Prometheus text page."""
    wanted = [line for line in text.splitlines()
              if any(_about(line, n) for n in names)]
    out: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families("\n".join(wanted) + "\n"):
            for sample in family.samples:
                if sample.name in names:
                    out[sample.name] = out.get(sample.name, 0.0) + sample.value
    except ValueError:  # not Prometheus text
        return {}
    return out


def _about(line: str, name: str) -> bool:
    """The line is a sample, # HELP or # TYPE of exactly `name` (not of a longer name starting with it)."""
    if line.startswith("#"):
        parts = line.split(None, 3)
        return len(parts) >= 3 and parts[1] in ("HELP", "TYPE") and parts[2] == name
    return line.startswith(name) and line[len(name):len(name) + 1] in ("{", " ", "\t")
