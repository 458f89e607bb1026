"""Issue 14, item 4: a user-given model path can neither wedge nor fool the leader.

The attack: `mkfifo m.gguf; agentd deploy x --model $PWD/m.gguf`. The
coordinator opened the FIFO on the event loop, so the leader stopped
answering, lost leadership, and the retried call wedged each new leader in
turn. A hung NFS mount did the same. Here: FIFOs and devices are refused at
once with a clear error, relative paths are refused, a read that hangs
times out in its own thread while the leader keeps answering, and a
non-GGUF file's bytes never reach an error message.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import grpc
import pytest

from agentd.errors import InvalidInput, NotAvailable
from agentd.inspection import BoundedInspector
from agentd.modelinfo import inspect_model
from agentd.testing.control_world import rpc_error, spec
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, simulated_host
from agentd.v1 import control_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_inspect_refuses_a_fifo_and_a_device_without_blocking(tmp_path):
    fifo = tmp_path / "m.gguf"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(InvalidInput, match=r"not a regular file \(a FIFO\)"):
        inspect_model(fifo)
    with pytest.raises(InvalidInput, match=r"not a regular file \(a character device\)"):
        inspect_model("/dev/zero")
    d = tmp_path / "dir"
    d.mkdir()
    os.mkfifo(d / "config.json")
    with pytest.raises(InvalidInput):
        inspect_model(d)
    assert time.monotonic() - started < 5


def test_a_non_gguf_files_bytes_are_not_echoed(tmp_path):
    f = tmp_path / "shadow.gguf"
    f.write_bytes(b"zq9X:$6$hashsecret:19000:0:99999:7:::\n")
    with pytest.raises(InvalidInput) as err:
        inspect_model(f)
    assert "not a GGUF file" in str(err.value)
    assert "zq9X" not in str(err.value) and "hashsecret" not in str(err.value)


async def test_a_hung_read_times_out_in_its_own_thread_and_stuck_threads_are_bounded():
    release = threading.Event()

    def hung(path: str):
        release.wait(10)
        raise InvalidInput("gone", where=path)

    ins = BoundedInspector(hung, timeout=0.2, threads=2)
    try:
        for _ in range(2):
            with pytest.raises(InvalidInput, match=r"did not finish within 0.2 s"):
                await ins("/nfs/m.gguf")
        assert ins.busy == 2
        with pytest.raises(NotAvailable, match="2 earlier model inspections are still blocked"):
            await ins("/nfs/m.gguf")
    finally:
        release.set()
    async with asyncio.timeout(5):
        while ins.busy:
            await asyncio.sleep(0.01)
    with pytest.raises(InvalidInput, match="must be absolute"):
        await ins("m.gguf")


async def test_a_fifo_deploy_is_refused_and_the_leader_keeps_answering(agents, model, tmp_path):
    a, b = agents
    fifo = tmp_path / "m.gguf"
    os.mkfifo(fifo)
    err = await rpc_error(b.stub.Deploy(pb.DeployRequest(spec=spec(fifo))))
    assert err.code() == INVALID
    assert err.details() == f"model: {fifo}: not a regular file (a FIFO): model files must be regular files"
    err = await rpc_error(a.stub.Deploy(pb.DeployRequest(spec=spec("m.gguf"))))
    assert err.code() == INVALID and "'m.gguf'" in err.details() and "relative paths are refused" in err.details()
    reply = await b.stub.Deploy(pb.DeployRequest(spec=spec(model)))  # the same leader, still answering
    assert reply.message == "deployment chat created"


async def test_a_hung_model_read_does_not_stop_the_leader(agents, model):
    a, _ = agents
    release = threading.Event()
    real = a.coordinator._inspect._inspect

    def hung_on_nfs(path: str):
        if path.startswith("/nfs/"):
            release.wait(10)
        return real(path)

    a.coordinator._inspect = BoundedInspector(hung_on_nfs, timeout=1.0)
    try:
        slow = asyncio.ensure_future(a.stub.Deploy(pb.DeployRequest(spec=spec("/nfs/m.gguf", name="slow"))))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        leader = await a.stub.Leader(pb.LeaderRequest())  # the loop is free while the read hangs
        assert leader.leader_id == "a" and time.monotonic() - started < 0.5
        err = await rpc_error(slow)
        assert err.code() == INVALID and "did not finish within 1 s" in err.details()
    finally:
        release.set()


@pytest.mark.slow
def test_a_real_leader_refuses_a_fifo_model_and_stays_leader(tmp_path):
    fifo = tmp_path / "m.gguf"
    os.mkfifo(fifo)
    good = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    with LocalCluster(tmp_path / "c", hosts=[simulated_host("a", gpus=1, gpu_gib=1.0)]) as c:
        c.start()
        c.wait_for_inventories()
        leader = c.wait_for_leader()
        with c.agents["a"].client(timeout=10) as cl:
            with pytest.raises(InvalidInput, match="not a regular file \\(a FIFO\\)"):
                cl.deploy(pb.DeploymentSpec(name="x", model=str(fifo), runtime="llamabox", replicas=1))
            assert c.leader() == leader  # same leader, same term: it never stopped answering
            reply = cl.deploy(pb.DeploymentSpec(name="y", model=str(good), runtime="llamabox", replicas=1,
                                                options=pb.RuntimeOptions(ctx_size=256)))
            assert reply.message == "deployment y created"
