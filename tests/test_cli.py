import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from agentd.cli.main import COMMANDS, build_parser, module_for
from agentd.testing.gguf import write_tiny_llama_gguf
from tests.conftest import run_cli


def _subcommand_paths(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _subcommand_paths(sub, (*prefix, name))


def test_every_subcommand_has_help():
    paths = list(_subcommand_paths(build_parser()))
    assert ("version",) in paths and ("config", "show") in paths
    for path in paths:
        proc = run_cli(*path, "--help")
        assert proc.returncode == 0, (path, proc.stderr)
        assert "usage: agentd" in proc.stdout


def test_version_json_lists_builtin_plugins():
    proc = run_cli("version", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["version"] and data["agentd"] == data["version"]
    plugins = {p["name"]: p for p in data["plugins"]}
    assert set(plugins) >= {"vllm", "llamabox", "sglang"}
    assert plugins["llamabox"]["distribution"] == "agentd-llamabox"
    assert plugins["llamabox"]["version"] == importlib.metadata.version("agentd-llamabox")
    from agentd.plugins.api import API_VERSION

    # read from package metadata, without importing the plugins
    assert plugins["llamabox"]["api"] == plugins["vllm"]["api"] == plugins["sglang"]["api"] == API_VERSION


def test_global_json_flag_before_subcommand():
    proc = run_cli("--json", "version")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["version"]


# What a command line imports decides how fast `agentd` starts (benchmarks/cli_startup.py measures it).
_IMPORTS = """
import json, os, sys
if os.environ.get("FAKE_AGENT"):  # a Control service answering empty-ish replies, in this process
    from concurrent import futures
    import grpc
    from agentd.v1 import control_pb2 as pb
    replies = {"Status": pb.StatusReply(node_id="n", term=3),
               "List": pb.ListReply(deployments=[pb.Deployment(spec=pb.DeploymentSpec(name="x", replicas=1))]),
               "ListInstances": pb.ListInstancesReply(instances=[pb.Instance(instance_id="x-r0-g1", state="RUNNING")])}
    handlers = {m: grpc.unary_unary_rpc_method_handler(lambda req, ctx, r=r: r.SerializeToString())
                for m, r in replies.items()}
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("agentd.v1.Control", handlers),))
    os.environ["AGENTD_SERVER"] = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
from agentd.cli.main import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def _modules_after(*argv: str, env: dict[str, str] | None = None, code: int = 0) -> set[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", _IMPORTS, *argv], capture_output=True, text=True, env=full_env,
                          timeout=60)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["code"] == code, proc.stderr
    return {m.split(".")[0] for m in report["modules"]} | set(report["modules"])


def test_version_reads_metadata_without_loading_plugins_grpc_or_pydantic():
    loaded = _modules_after("version", "--json")
    assert not loaded & {"agentd_llamabox", "agentd_vllm", "pluggy", "grpc", "pydantic", "pydantic_settings",
                         "agentd.config", "agentd.plugins"}, loaded
    # The dist-info files are read directly: importlib.metadata's email parser was a third of the command.
    assert not loaded & {"importlib.metadata", "email.message"}, loaded


@pytest.mark.parametrize("command", ["status", "ps", "ls"])
def test_client_commands_load_neither_pydantic_nor_the_other_commands(tmp_path, command):
    cfg = tmp_path / "agentd.toml"
    cfg.write_text('listen = "127.0.0.1:1"\n')  # AGENTD_SERVER (the fake agent) wins
    env = {"AGENTD_CONFIG": str(cfg), "AGENTD_INSECURE": "1", "FAKE_AGENT": "1"}
    loaded = _modules_after(command, env=env)
    assert "grpc" in loaded
    assert not loaded & {"pydantic", "pydantic_settings", "cryptography", "agentd.config", "agentd.placement",
                         "agentd.cli.security", "agentd.cli.plan", "importlib.metadata",
                         "google.protobuf.json_format"}, loaded
    assert "google.protobuf.json_format" in _modules_after(command, "--json", env=env)  # the check can fail


def test_command_table_matches_what_each_module_registers():
    every = [name for names in COMMANDS.values() for name in names]
    assert len(every) == len(set(every))
    for module, names in COMMANDS.items():
        assert tuple(_top_level(build_parser([module]))) == names, module
    assert tuple(_top_level(build_parser())) == tuple(every)


def _top_level(parser):
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


@pytest.mark.parametrize("argv,module", [
    (["ps"], "cluster"), (["--json", "status"], "cluster"), (["--log-level", "debug", "version"], "basic"),
    (["--log-format=json", "token", "ls"], "security"), (["plan", "--json"], "plan"), (["--help"], None),
    (["--log-lev", "debug", "ps"], None), (["nope"], None), ([], None), (["--log-level"], None),
])
def test_module_for_reads_the_command_word(argv, module):
    assert module_for(argv) == module


def test_a_command_module_alone_gives_the_same_help_as_the_whole_parser():
    whole = dict(_help_texts(build_parser()))
    for module in COMMANDS:
        for path, text in _help_texts(build_parser([module])):
            assert text == whole[path], path


def _help_texts(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield (*prefix, name), sub.format_help()
                yield from _help_texts(sub, (*prefix, name))


def test_a_usage_error_after_a_known_command_is_worded_by_the_whole_parser():
    proc = run_cli("ps", "--bogus", "--server", "127.0.0.1:1")
    assert (proc.returncode, proc.stderr.strip()) == (
        2, "agentd: error: unrecognized arguments: --bogus (see 'agentd --help')")


@pytest.mark.parametrize("argv", [["--bogus"], ["version", "--nope"], ["config", "show", "--log-level", "loud"],
                                  ["no-such-command"]])
def test_bad_flags_give_one_line_and_exit_2(argv):
    proc = run_cli(*argv)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("agentd: error:")
    assert "Traceback" not in proc.stderr


def test_config_show_json_reflects_env():
    proc = run_cli("config", "show", "--json", env={"AGENTD_NODE_NAME": "gpu-node-7"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["settings"]["node_name"] == "gpu-node-7"


def test_invalid_config_is_one_line_exit_2(tmp_path):
    cfg = tmp_path / "agentd.toml"
    cfg.write_text('heartbeat_interval = "800ms"\n')
    proc = run_cli("config", "show", env={"AGENTD_CONFIG": str(cfg)})
    assert proc.returncode == 2
    assert "election_timeout_min" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_broken_pipe_is_not_an_error():
    """`agentd ... | head` must not print an internal error when the reader leaves first."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "agentd", "config", "show", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before agentd writes a byte
    _, err = proc.communicate(timeout=60)
    assert "internal error" not in err and "Traceback" not in err, err
    assert proc.returncode == 0


@pytest.mark.parametrize("argv,message", [
    (["plan", "--cluster", "examples/clusters/small.json", "--model", "{model}", "--runtime", "llamabox",
      "--selector", "rack"], "agentd: error: --selector expects KEY=VALUE, got 'rack'"),
    (["deploy", "x", "--model", "{model}", "--runtime", "llamabox", "--env", "=1", "--server", "127.0.0.1:1"],
     "agentd: error: --env expects KEY=VALUE, got '=1'"),
])
def test_a_key_value_option_without_a_key_is_one_line_exit_2(tmp_path, argv, message):
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    proc = run_cli(*(a.format(model=model) for a in argv))
    assert (proc.returncode, proc.stderr.strip()) == (2, message), proc.stderr


def test_version_reads_the_entry_point_group_the_plugin_manager_loads():
    from agentd.cli.basic import PLUGIN_GROUP
    from agentd.plugins.manager import ENTRY_POINT_GROUP

    assert PLUGIN_GROUP == ENTRY_POINT_GROUP
