"""One exception tree for the whole daemon.

Callers catch the narrowest class they can act on. The CLI maps them to exit
codes (InvalidInput -> 2, Unplaceable/NotAvailable -> 3) and the gRPC API maps
them to status codes, so an error raised deep in a parser reaches the user as
one clear sentence, never as a traceback.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms of `agentd version`)
if TYPE_CHECKING:
    from typing import Any


class AgentdError(Exception):
    """Base of every error agentd raises on purpose."""


class InvalidInput(AgentdError):
    """The input (a file, a request, a flag, a peer message) is malformed.

    `where` names the file, key or offset so the user can find the problem.
    """

    def __init__(self, message: str, *, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class ConfigError(InvalidInput):
    """The configuration cannot be loaded or breaks an invariant."""


class Unplaceable(AgentdError):
    """A deployment has no valid layout on the current cluster.

    Carries the structured diagnosis (agentd.types.Diagnosis) so callers can
    print or serialise the per-host, per-GPU reasons.
    """

    def __init__(self, diagnosis):
        self.diagnosis = diagnosis
        super().__init__(diagnosis.message)


class NotAvailable(AgentdError):
    """Something needed is not there right now (no leader, host down, binary missing)."""


class PeerError(AgentdError):
    """A peer sent something we cannot accept (garbage, a stale term, a bad state)."""


class StaleTerm(PeerError):
    """A command is stamped with a Raft term older than the newest one seen (fencing)."""

    def __init__(self, got: int, newest: int):
        self.got = got
        self.newest = newest
        super().__init__(f"stale term {got}: newest seen is {newest}")


class UpgradeRequired(AgentdError):
    """Versions disagree: a log entry or snapshot newer than this agent can apply, a write the cluster's
    oldest member could not apply, or a peer too many versions away (docs/versioning.md)."""


class PluginError(AgentdError):
    """A plugin failed to load or raised inside a hook."""


class RuntimeFailure(AgentdError):
    """A runtime process could not be started or supervised."""


class BinaryNotUsable(RuntimeFailure):
    """The program of a spec is missing or cannot be executed."""


def validation_message(exc: Any, root: str = "value") -> str:
    """One line naming each bad field of a pydantic ValidationError ("replicas: Input should be ...");
    `root` names a whole-value error. Here, below every layer that validates input, so all of them say it
    the same way."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or root
        parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
