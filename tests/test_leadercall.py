"""A call to a leader that hangs is given up once another leader is known (agentd/cluster/leadercall.py)."""

import asyncio

import grpc
import pytest

from agentd.cluster.leadercall import LeaderMoved, unless_leader_moves


class Leader:
    """What the caller knows of the leader: Raft's leader_id, changed by the test."""

    def __init__(self, leader_id: str | None):
        self.leader_id = leader_id


async def test_an_answer_is_returned_and_an_error_raised_as_they_come():
    who = Leader("a")
    assert await unless_leader_moves(asyncio.sleep(0.01, result="ok"), lambda: who.leader_id, period=0.005) == "ok"

    async def fails() -> None:
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        await unless_leader_moves(fails(), lambda: who.leader_id)


async def test_an_election_in_progress_is_waited_out_a_new_leader_is_not():
    who = Leader("a")
    never = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(unless_leader_moves(never, lambda: who.leader_id, period=0.005))
    await asyncio.sleep(0.05)
    who.leader_id = None  # an election: the old leader may still win it
    await asyncio.sleep(0.05)
    assert not task.done()
    who.leader_id = "b"
    with pytest.raises(LeaderMoved, match="from a to b"):
        await asyncio.wait_for(task, 10)
    assert never.cancelled()


async def test_a_grpc_call_to_a_hung_leader_is_cancelled_on_the_wire():
    server = grpc.aio.server()
    never, cancelled = asyncio.Event(), asyncio.Event()

    async def stuck(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b""

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "agentd.v1.Agent", {"Report": grpc.unary_unary_rpc_method_handler(stuck)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    who = Leader("hung")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/agentd.v1.Agent/Report")(b"", timeout=60)
            task = asyncio.create_task(unless_leader_moves(call, lambda: who.leader_id))
            await asyncio.sleep(0.2)
            assert not task.done()
            who.leader_id = "new"
            with pytest.raises(LeaderMoved):
                await asyncio.wait_for(task, 10)
            await asyncio.wait_for(cancelled.wait(), 10)  # the hung server was told, not left holding the call
    finally:
        never.set()
        await server.stop(0)
