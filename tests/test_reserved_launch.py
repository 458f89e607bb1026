"""Issue 14, item 3: launch arguments and environment cannot undo isolation or the memory booking.

The attack: an admin's `--arg=--host --arg=0.0.0.0`, `--arg=-m --arg=/etc/passwd`,
`--arg=--api-key --arg=K` and `--env LD_PRELOAD=...` all reached the model
server, and so did flags that change what it allocates (`-ngl`,
`--tensor-split`, `--ctx-size`, `-fa`, `-b`, `-ub`, `-np`). Each plugin now
declares what only agentd may set (hook `agentd_reserved_launch`), and a
deploy that sets one is refused with INVALID_ARGUMENT naming it.
"""

from __future__ import annotations

import grpc
import pytest

from agentd.errors import InvalidInput
from agentd.plugins import PluginManager, ReservedLaunch, hookimpl
from agentd.plugins.reserved import check_launch_options
from agentd.testing.control_world import rpc_error, spec
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, simulated_host
from agentd.types import DeploymentSpec, RuntimeOptions
from agentd.v1 import control_pb2 as pb
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def plugins() -> PluginManager:
    return PluginManager.load()


def refused(plugins: PluginManager, runtime: str, args=(), env=None) -> str | None:
    s = DeploymentSpec(name="x", model="/m", runtime=runtime,
                       options=RuntimeOptions(extra_args=tuple(args), env=env or {}))
    try:
        plugins.check_launch_options(s)
    except InvalidInput as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(("args", "flag"), [
    (["--host", "0.0.0.0"], "--host"), (["--host=0.0.0.0"], "--host"), (["--port", "1"], "--port"),
    (["-m", "/etc/passwd"], "-m"), (["--model=/etc/passwd"], "--model"), (["--api-key", "K"], "--api-key"),
    (["--rpc", "10.0.0.9:1"], "--rpc"), (["-ngl", "99"], "-ngl"), (["--n-gpu-layers=99"], "--n-gpu-layers"),
    (["--tensor-split", "1,1"], "--tensor-split"), (["-ts", "1,1"], "-ts"), (["-c", "99999"], "-c"),
    (["-c99999"], "-c"), (["--ctx-size=99999"], "--ctx-size"), (["--ctx_size", "9"], "--ctx-size"),
    (["-fa", "on"], "-fa"), (["--flash-attn=on"], "--flash-attn"), (["-b", "4096"], "-b"), (["-ub", "2048"], "-ub"),
    (["-np", "64"], "-np"), (["--parallel", "64"], "--parallel"), (["-sm", "row"], "-sm"),
    (["-ot", "x=CUDA0"], "-ot"), (["--op-offload"], "--op-offload"), (["--fit", "on"], "--fit"),
    (["--log-file", "/etc/cron.d/x"], "--log-file"), (["-lv", "4", "--path", "/"], "--path"),
])
def test_llamabox_refuses_what_only_agentd_sets(plugins, args, flag):
    message = refused(plugins, "llamabox", args)
    assert message is not None and f": {flag} is set by agentd for runtime llamabox" in message
    assert message.startswith("options.extra_args: '")


@pytest.mark.parametrize(("args", "flag"), [
    (["--host", "0.0.0.0"], "--host"), (["--api-key=K"], "--api-key"), (["-tp", "8"], "-tp"), (["-tp8"], "-tp"),
    (["--tensor-parallel-size=8"], "--tensor-parallel-size"), (["--pipeline_parallel_size", "2"],
                                                               "--pipeline-parallel-size"),
    (["--gpu-memory-utilization", "0.99"], "--gpu-memory-utilization"), (["--max-model-len", "9"], "--max-model-len"),
    (["--max-model", "9"], "--max-model-len"),  # argparse takes unambiguous prefixes
    (["--gpu-memory-util=0.99"], "--gpu-memory-utilization"), (["--served-model-name", "x"], "--served-model-name"),
    (["--config", "/tmp/evil.yaml"], "--config"),
])
def test_vllm_refuses_what_only_agentd_sets(plugins, args, flag):
    message = refused(plugins, "vllm", args)
    assert message is not None and f": {flag} is set by agentd for runtime vllm" in message


@pytest.mark.parametrize("runtime", ["llamabox", "vllm"])
@pytest.mark.parametrize("name", ["LD_PRELOAD", "LD_LIBRARY_PATH", "PATH", "PYTHONPATH", "CUDA_VISIBLE_DEVICES"])
def test_no_runtime_may_be_given_loader_path_or_device_variables(plugins, runtime, name):
    assert refused(plugins, runtime, env={name: "x"}) == (
        f"options.env: {name} is set by agentd for runtime {runtime} and may not be given"
        + (" (agentd chooses the GPUs from the plan; use --pin HOST:GPU,... or --exclude-gpu)"
           if name == "CUDA_VISIBLE_DEVICES" else " (it would undo isolation or the memory booking)"))


def test_runtime_specific_variables(plugins):
    assert "LLAMA_ARG_HOST" in refused(plugins, "llamabox", env={"LLAMA_ARG_HOST": "0.0.0.0"})
    assert "VLLM_API_KEY" in refused(plugins, "vllm", env={"VLLM_API_KEY": "k"})
    assert refused(plugins, "vllm", env={"LLAMA_ARG_HOST": "x"}) is None  # not vLLM's


def test_ordinary_arguments_and_variables_pass(plugins):
    assert refused(plugins, "llamabox", ["-lv", "4", "-t", "1", "--lora", "/m/l.gguf", "-cb", "--temp", "0.5"],
                   {"HF_TOKEN": "x", "OMP_NUM_THREADS": "2"}) is None
    assert refused(plugins, "vllm", ["--enforce-eager", "--max-num-seqs", "8", "--trust-remote-code"],
                   {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}) is None


def test_a_third_party_plugin_declares_its_own():
    class SGLang:
        @hookimpl
        def agentd_reserved_launch(self, runtime):
            if runtime != "llamabox":  # it may restrict another plugin's runtime too
                return None
            return ReservedLaunch(flags=("--dist-init-addr",), env=("SGLANG_KEY",), hints={"SGLANG_KEY": "no"})

    pm = PluginManager.load()
    assert refused(pm, "llamabox", ["--dist-init-addr", "x"]) is None
    pm.register(SGLang(), "sglang-test")
    assert "--dist-init-addr is set by agentd" in refused(pm, "llamabox", ["--dist-init-addr=x"])
    assert refused(pm, "llamabox", env={"SGLANG_KEY": "1"}).endswith("may not be given (no)")
    assert "--host" in refused(pm, "llamabox", ["--host", "x"]), "the built-in declaration still applies"


def test_check_launch_options_is_pure_and_names_the_first_offender():
    r = ReservedLaunch(flags=("-x", "--long-flag"), abbreviations=True)
    with pytest.raises(InvalidInput, match="'--long': --long-flag"):
        check_launch_options("rt", ["ok", "--long", "v", "-x"], {}, r)
    check_launch_options("rt", ["-", "--", "value-x", "-y"], {}, r)


async def test_the_control_api_answers_invalid_argument(agents, model, plugins):
    a, b = agents
    a.coordinator._validate_spec = plugins.check_launch_options
    bad = spec(model)
    bad.options.extra_args.extend(["--host", "0.0.0.0"])
    err = await rpc_error(b.stub.Deploy(pb.DeployRequest(spec=bad)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("options.extra_args: '--host': --host is set by agentd for runtime llamabox")
    assert "chat" not in a.state.deployments


@pytest.mark.slow
def test_a_real_cluster_refuses_reserved_flags_through_the_cli(tmp_path):
    good = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    with LocalCluster(tmp_path / "c", hosts=[simulated_host("a", gpus=1, gpu_gib=1.0)]) as c:
        c.start()
        c.wait_for_inventories()
        a = c.agents["a"]
        env = {"AGENTD_INSECURE": "1", "HOME": str(tmp_path)}
        base = ["deploy", "x", "--model", str(good), "--runtime", "llamabox", "--ctx-size", "256", "--server", a.listen]
        for extra, named in [(["--arg=--host", "--arg=0.0.0.0"], "--host"), (["--arg=-m", "--arg=/etc/passwd"], "-m"),
                             (["--arg=--api-key", "--arg=K"], "--api-key"), (["--env", "LD_PRELOAD=/tmp/x.so"],
                                                                            "LD_PRELOAD"),
                             (["--arg=-ngl", "--arg=99"], "-ngl"), (["--arg=--ctx-size=99999"], "--ctx-size")]:
            r = run_cli(*base, *extra, env=env)
            assert r.returncode == 2 and f"{named} is set by agentd for runtime llamabox" in r.stderr, r.stderr
        r = run_cli(*base, "--arg=-lv", "--arg=4", env=env)
        assert r.returncode == 0, r.stderr
