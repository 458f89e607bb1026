import json

import pytest

from agentd.cli.main import build_parser
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
    assert data["agentd"]
    assert set(data["plugins"]) >= {"vllm", "llamabox"}


def test_global_json_flag_before_subcommand():
    proc = run_cli("--json", "version")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["agentd"]


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
