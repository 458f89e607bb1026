"""The sglang tier: every flag agentd passes to SGLang, checked against the installed SGLang's own parser.

Needs `.venv-sglang` (`scripts/bootstrap --sglang`: sglang 0.5.23 without its CUDA dependencies, its light
dependencies and a CPU torch). SGLang cannot serve on this CPU-only machine, so the tier checks what can be
checked without a GPU: that `python -m sglang.launch_server` would accept each command line agentd builds,
with the values agentd meant (argparse takes prefixes, so a renamed flag could silently mean another one),
and that each flag agentd reserves exists. Skips locally when the environment is absent; fails with CI=true.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from agentd_sglang import process as sp

from agentd.modelinfo import inspect_model
from agentd.placement import place
from agentd.plugins import PluginManager
from agentd.plugins.api import LaunchContext
from agentd.types import Assignment, PartEndpoint
from tests.scenarios.build import cluster, host, spec

ROOT = Path(__file__).resolve().parents[3]
PYTHON = ROOT / ".venv-sglang" / "bin" / "python"

pytestmark = [pytest.mark.sglang, pytest.mark.slow]
if not PYTHON.exists():
    if os.environ.get("CI") == "true":
        pytest.fail(f"{PYTHON} is absent: CI must run the sglang tier (scripts/bootstrap --sglang)", pytrace=False)
    pytest.skip(f"{PYTHON} is absent: the sglang tier needs `scripts/bootstrap --sglang`", allow_module_level=True)

# Parses each argv (after `python -m sglang.launch_server`) with SGLang's own parser, exactly as
# launch_server does (ServerArgs.add_cli_args), and prints the values agentd sets.
PARSE = r"""
import argparse, json, sys
from sglang.srt.server_args import ServerArgs
p = argparse.ArgumentParser()
ServerArgs.add_cli_args(p)
out = {"flags": sorted(o for a in p._actions for o in a.option_strings), "parsed": []}
for argv in json.loads(sys.stdin.read()):
    ns = vars(p.parse_args(argv))
    out["parsed"].append({k: ns.get(k) for k in (
        "model_path", "host", "port", "served_model_name", "api_key", "tp_size", "pp_size", "ep_size",
        "mem_fraction_static", "chunked_prefill_size", "max_running_requests", "context_length", "nnodes",
        "node_rank", "dist_init_addr", "nccl_port", "attn_dp_size")})
print(json.dumps(out))
"""


class _Settings:
    ray_port_range = (30000, 30999)


def _parse(argvs: list[list[str]]) -> dict:
    out = subprocess.run([str(PYTHON), "-c", PARSE], input=json.dumps(argvs), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[list[list[str]], Assignment]:
    """The command lines of a real plan: Mixtral (MoE: expert parallel) on two hosts of two GPUs."""
    plugins = PluginManager.load(allow=["sglang"])
    m = inspect_model(ROOT / "tests" / "fixtures" / "hf" / "Mixtral-8x7B-Instruct-v0.1")
    s = spec("sglang", name="mix", ctx=8192)
    rp = place(cluster(host("n1", 2, total_gib=40), host("n2", 2, total_gib=40)), m, s, plugins=plugins).replicas[0]
    assert rp.pipeline_parallel == 2 and len(rp.parts) == 2
    eps = tuple(PartEndpoint(host=p.host, address=f"10.0.0.{i + 1}", port=8000 + i) for i, p in enumerate(rp.parts))
    a = Assignment(deployment="mix", replica=0, term=1, model="/models/mixtral", runtime="sglang", plan=rp,
                   endpoints=eps, api_key="k" * 32)
    tmp = tmp_path_factory.mktemp("sglang")
    argvs = []
    for i in range(2):
        ctx = LaunchContext(node=f"n{i + 1}", work_dir=tmp, settings=_Settings(), port=lambda key, i=i: 40000 + i)
        [proc] = sp.launch(a, i, ctx)
        assert proc.argv[1:3] == ("-m", "sglang.launch_server")
        argvs.append(list(proc.argv[3:]))
    return argvs, a


def test_sglangs_parser_reads_each_command_line_as_agentd_meant(launched):
    argvs, a = launched
    got = _parse(argvs)["parsed"]
    plan = dict(zip(a.plan.args[::2], a.plan.args[1::2], strict=False))
    port = sp.dist_init_port(a.instance_id, _Settings.ray_port_range)
    for rank, ns in enumerate(got):
        assert ns["model_path"] == "/models/mixtral" and ns["served_model_name"] == "mix"
        assert (ns["host"], ns["port"]) == (f"10.0.0.{rank + 1}", 8000 + rank) and ns["api_key"] == "k" * 32
        assert (ns["tp_size"], ns["pp_size"], ns["ep_size"]) == (2, 2, 2)
        assert ns["mem_fraction_static"] == float(plan["--mem-fraction-static"])
        assert (ns["chunked_prefill_size"], ns["max_running_requests"], ns["context_length"]) == (8192, 256, 8192)
        assert (ns["nnodes"], ns["node_rank"], ns["dist_init_addr"]) == (2, rank, f"10.0.0.1:{port}")
        assert ns["nccl_port"] == 40000 + rank


def test_every_reserved_flag_is_one_sglang_has(launched):
    flags = set(_parse([])["flags"])
    assert len(flags) > 300  # the whole parser, not a stub
    assert [f for f in sp.RESERVED.flags if f not in flags] == []


def test_dp_attention_on_one_host_parses_with_its_own_rendezvous_block(tmp_path):
    """DeepSeek-R1 on eight H200s: expert parallel and DP attention, which talks over TCP ports derived from
    the dist-init port, so agentd passes one from a block it reserved."""
    from agentd.types import GpuPin

    plugins = PluginManager.load(allow=["sglang"])
    m = inspect_model(ROOT / "tests" / "fixtures" / "hf" / "DeepSeek-R1")
    s = spec("sglang", name="r1", ctx=8192, pin=(GpuPin(host="h200", gpus=tuple(range(8))),))
    rp = place(cluster(host("h200", 8, total_gib=141)), m, s, plugins=plugins).replicas[0]
    a = Assignment(deployment="r1", replica=0, term=1, model="/models/r1", runtime="sglang", plan=rp,
                   endpoints=(PartEndpoint(host="h200", address="10.0.0.9", port=8000),))
    ctx = LaunchContext(node="h200", work_dir=tmp_path, settings=_Settings(), port=lambda key: 40100,
                        ray_port=lambda key, count=1: 31000)
    [proc] = sp.launch(a, 0, ctx)
    [ns] = _parse([list(proc.argv[3:])])["parsed"]
    assert (ns["tp_size"], ns["ep_size"], ns["attn_dp_size"], ns["nnodes"]) == (8, 8, 8, 1)
    assert ns["dist_init_addr"] == "10.0.0.9:31000"
    assert {e.port for e in proc.ports} >= {8000, 40100, *range(31000, 31007)}

