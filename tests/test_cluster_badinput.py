"""Bad input against one real agent: every request gets a proper status and a sentence, nothing is committed.

One `agentd serve` process (one simulated 0.272 GiB GPU, which holds one
replica of the tiny model) serves the module. After each test the agent must
still answer and its commit index must not have moved: a refused request
leaves no trace in the replicated log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, simulated_host
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

MAX_MESSAGE = 8 << 20  # the agent's gRPC receive limit (agentd.cluster.raft.transport.CHANNEL_OPTIONS)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="module")
def agent(tmp_path_factory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("agent"), hosts=[simulated_host("a", gpus=1, gpu_gib=0.272)])
    try:
        c.start()
        c.wait_for_inventories()
        # The coordinator's first tick records the host as up (one entry); after that the log is quiet.
        deadline = time.monotonic() + 15
        while "host a reporting: marked up" not in c.agents["a"].log_file.read_text():
            assert time.monotonic() < deadline, "the agent never marked itself up"
            time.sleep(0.05)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def channel(agent) -> Iterator[grpc.Channel]:
    # The client may send more than the server accepts: the oversized test needs that.
    ch = grpc.insecure_channel(agent.agents["a"].listen, options=[("grpc.max_send_message_length", 64 << 20)])
    yield ch
    ch.close()


@pytest.fixture(autouse=True)
def nothing_committed(agent, channel) -> Iterator[None]:
    stub = pb_grpc.ControlStub(channel)
    before = stub.Status(pb.StatusRequest(), timeout=5)
    yield
    after = stub.Status(pb.StatusRequest(), timeout=5)  # the agent still answers
    assert agent.agents["a"].alive
    assert (after.commit_index, after.last_applied) == (before.commit_index, before.last_applied)
    assert stub.List(pb.ListRequest(), timeout=5).deployments == []


def raw(channel: grpc.Channel, method: str, stream: bool = False):
    """A method called with bytes as they are, bypassing the client's own serialisation."""
    if stream:
        return channel.unary_stream(method, request_serializer=None, response_deserializer=None)
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def spec(model_path: Path, **fields) -> pb.DeploymentSpec:
    values = {"name": "chat", "model": str(model_path), "runtime": "llamabox", "replicas": 1, **fields}
    options = values.pop("options", pb.RuntimeOptions(ctx_size=256))
    return pb.DeploymentSpec(options=options, **values)


def deploy_error(channel: grpc.Channel, s: pb.DeploymentSpec) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.ControlStub(channel).Deploy(pb.DeployRequest(spec=s), timeout=10)
    return err.value


# ---------------------------------------------------------------------- garbage and size


@pytest.mark.parametrize("method,message", [
    ("/agentd.v1.Control/Deploy", "agentd.v1.DeployRequest"),
    ("/agentd.v1.Control/Scale", "agentd.v1.ScaleRequest"),
    ("/agentd.v1.Control/Delete", "agentd.v1.DeleteRequest"),
    ("/agentd.v1.Control/Plan", "agentd.v1.PlanRequest"),
    ("/agentd.v1.Agent/Report", "agentd.v1.ReportRequest"),
])
@pytest.mark.parametrize("data", [b"\xff\xff\xff\xff", b"garbage bytes, not protobuf", b"\x0a\x05hel",
                                  b"\x12\x80\x80\x80\x80\x10"], ids=["ff", "text", "truncated", "huge-length"])
def test_garbage_bytes_are_invalid_argument(channel, method, message, data):
    with pytest.raises(grpc.RpcError) as err:
        raw(channel, method)(data, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == (f"{method[1:].replace('/', '.')}: the request ({len(data)} bytes) is not a valid "
                                   f"{message} message")


def test_garbage_bytes_to_a_stream_are_invalid_argument(channel):
    with pytest.raises(grpc.RpcError) as err:
        list(raw(channel, "/agentd.v1.Control/Watch", stream=True)(b"\xff\xff", timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid agentd.v1.WatchRequest message" in err.value.details()


def test_bytes_that_parse_but_make_no_spec_name_every_bad_field(channel):
    # Field 1 (spec) holding only `replicas: 150`: a valid message, an empty spec.
    with pytest.raises(grpc.RpcError) as err:
        raw(channel, "/agentd.v1.Control/Deploy")(b"\x0a\x03\x20\x96\x01", timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert details.startswith("deployment spec: name: must be a DNS label")
    assert "model: must not be empty" in details and "runtime: must not be empty" in details


def test_an_oversized_message_is_resource_exhausted(channel):
    data = pb.DeployRequest(spec=pb.DeploymentSpec(name="big", model="x" * (MAX_MESSAGE + 1024))).SerializeToString()
    with pytest.raises(grpc.RpcError) as err:
        raw(channel, "/agentd.v1.Control/Deploy")(data, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.value.details()


# ---------------------------------------------------------------------- invalid specs


@pytest.mark.parametrize("fields,expected", [
    ({"runtime": "nope"}, "runtime: unknown runtime 'nope' (available: "),
    ({"model": "/nonexistent/model.gguf"}, "model: /nonexistent/model.gguf: no such file or directory"),
    ({"replicas": -1}, "deployment spec: replicas: Input should be greater than or equal to 0"),
    ({"name": ""}, "deployment spec: name: must be a DNS label"),
    ({"name": "Not_A-Label"}, "deployment spec: name: must be a DNS label"),
    ({"model": "  "}, "deployment spec: model: must not be empty"),
    ({"strategy": "random"}, "deployment spec: strategy: Input should be 'binpack' or 'spread'"),
    ({"options": pb.RuntimeOptions(gpu_memory_utilization=1.5)},
     "deployment spec: options.gpu_memory_utilization: Input should be less than or equal to 1"),
], ids=["runtime", "missing-model", "negative-replicas", "empty-name", "bad-name", "blank-model", "strategy",
        "utilization"])
def test_an_invalid_spec_is_invalid_argument_naming_the_field(channel, model, fields, expected):
    err = deploy_error(channel, spec(model, **fields))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(expected), err.details()


def test_a_model_file_that_is_not_a_model_is_invalid_argument(channel, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    err = deploy_error(channel, spec(junk))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"model: {junk}"), err.details()


def test_scale_and_delete_of_unknown_deployments_are_not_found(channel):
    stub = pb_grpc.ControlStub(channel)
    for call, request in ((stub.Scale, pb.ScaleRequest(name="ghost", replicas=2)),
                          (stub.Delete, pb.DeleteRequest(name="ghost")), (stub.Get, pb.GetRequest(name="ghost"))):
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=5)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.NOT_FOUND, "no deployment named 'ghost'")


# ---------------------------------------------------------------------- does not fit


def test_a_model_that_does_not_fit_is_failed_precondition_with_the_diagnosis(channel, model):
    err = deploy_error(channel, spec(model, name="big", replicas=2))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details().startswith("0/1 hosts can run big (llamabox) as replica 2 of 2: "), err.details()
    # The dry run says the same, and commits nothing either.
    reply = pb_grpc.ControlStub(channel).Plan(pb.PlanRequest(spec=spec(model, name="big", replicas=2)), timeout=10)
    plan = json.loads(reply.plan_json)
    assert not reply.placed and plan["diagnosis"]["message"] == err.details()


# ---------------------------------------------------------------------- peers


def test_a_report_with_garbage_inventory_is_invalid_argument_and_not_recorded(channel):
    agent_stub, control = pb_grpc.AgentStub(channel), pb_grpc.ControlStub(channel)
    cases = [
        ("intruder", "not json {", "report from 'intruder': not a host inventory: inventory_json: Invalid JSON"),
        ("intruder", json.dumps({"gpus": []}), "report from 'intruder': not a host inventory: name: Field required"),
        ("intruder", json.dumps({"name": "intruder", "gpus": [{"index": -1, "uuid": "x", "memory_total": 1,
                                                               "memory_used": 0}]}),
         "report from 'intruder': not a host inventory: gpus.0.index: Input should be greater than or equal to 0"),
        ("intruder", json.dumps({"name": "a"}), "report from 'intruder' carries the inventory of 'a'"),
    ]
    for node, inventory, expected in cases:
        with pytest.raises(grpc.RpcError) as err:
            agent_stub.Report(pb.ReportRequest(node=node, inventory_json=inventory), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(expected), err.value.details()
    nodes = control.ListNodes(pb.ListNodesRequest(), timeout=5).nodes
    assert [n.name for n in nodes] == ["a"]


# ---------------------------------------------------------------------- the CLI's exit codes


def test_the_cli_exits_2_for_an_invalid_spec_and_3_for_one_that_does_not_fit(agent, model):
    server = agent.agents["a"].listen
    r = run_cli("deploy", "chat", "--model", str(model), "--runtime", "nope", "--server", server)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("agentd: error: runtime: unknown runtime 'nope'"), r.stderr
    r = run_cli("deploy", "chat", "--model", str(model), "--runtime", "llamabox", "--replicas", "-1",
                "--server", server)
    assert r.returncode == 2 and "replicas: Input should be greater than or equal to 0" in r.stderr, r.stderr
    r = run_cli("deploy", "big", "--model", str(model), "--runtime", "llamabox", "--replicas", "2",
                "--ctx-size", "256", "--server", server)
    assert r.returncode == 3 and r.stdout == ""
    assert r.stderr.startswith("agentd: 0/1 hosts can run big (llamabox) as replica 2 of 2: "), r.stderr
    assert all("Traceback" not in x for x in (r.stdout, r.stderr))
