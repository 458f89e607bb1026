"""One message and the peer's answer on a client's gRPC stream, which the peer may end at any moment.

A host's report stream (agentd/api/report_stream.py) and a voter's relay stream (agentd/cluster/relay.py)
write a message, then read the answer. When the peer ends the call (a voter that stops relaying, a leader
that steps down or dies) just before the write, gRPC Core refuses the message, and grpc.aio then replaces
the call's status by INTERNAL "Internal error from Core", even where the status that ended the call had
already arrived (grpcio 1.85: aio/_call.py `_write`, cygrpc `set_internal_error`). That status is lost.
Read as the call's status, the INTERNAL made an ordinary end of stream look like a broken peer in the logs,
dozens of times per fleet run. `exchange` reports such an end as `CallEnded` instead.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

# grpc.aio's details on the INTERNAL it sets when Core refused to send a message because the call had ended.
# A peer's own INTERNAL carries its own details, and is raised as it is.
CORE_REFUSED_SEND = "Internal error from Core"


class CallEnded(Exception):
    """The peer had ended the call before the message went out; grpc does not say how (see the module)."""


async def exchange(call: Any, message: Any) -> Any:
    """Write `message` on the client stream `call`, then return the peer's next message, or grpc.aio.EOF
    where the peer ended the call with OK. A call ended with an error status raises that status (an
    AioRpcError); a call whose status grpc lost raises `CallEnded`."""
    try:
        await call.write(message)
    except asyncio.InvalidStateError:
        pass  # it had ended before the write began: `read` raises its status, or returns EOF
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.INTERNAL and exc.details() == CORE_REFUSED_SEND:
            raise CallEnded("the peer had ended the stream before the message went out") from None
        raise
    return await call.read()
