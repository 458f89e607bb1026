"""A small synchronous Control client for the CLI and scripts.

gRPC status codes become agentd errors, so the CLI's exit codes follow:
INVALID_ARGUMENT / NOT_FOUND / ALREADY_EXISTS -> InvalidInput (2),
FAILED_PRECONDITION (cannot be placed) and UNAVAILABLE -> exit 3.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from agentd.errors import AgentdError, InvalidInput, NotAvailable
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT = 60.0


class CannotPlace(NotAvailable):
    """The coordinator could not place the deployment; the message is its diagnosis."""


def error_from_rpc(exc: grpc.RpcError, address: str) -> AgentdError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
                grpc.StatusCode.OUT_OF_RANGE):
        return InvalidInput(details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return CannotPlace(details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return NotAvailable(f"agent at {address} is not available: {details}")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return InvalidInput(f"refused by {address}: {details}")
    return AgentdError(f"{address}: {code.name if code else 'error'}: {details}")


class ControlClient:
    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT,
                 credentials: grpc.ChannelCredentials | None = None):
        self.address = address
        self.timeout = timeout
        self._channel = (grpc.secure_channel(address, credentials) if credentials
                         else grpc.insecure_channel(address))
        self.stub = pb_grpc.ControlStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.address) from None

    def stream(self, method: str, request: Any) -> Iterator[Any]:
        try:
            yield from getattr(self.stub, method)(request)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise error_from_rpc(exc, self.address) from None

    # Convenience wrappers used by the CLI and tests.
    def deploy(self, spec: pb.DeploymentSpec, replace: bool = False) -> pb.DeployReply:
        return self.call("Deploy", pb.DeployRequest(spec=spec, replace=replace))

    def leader(self) -> pb.LeaderReply:
        return self.call("Leader", pb.LeaderRequest())

    def status(self) -> pb.StatusReply:
        return self.call("Status", pb.StatusRequest())
