"""What this agent is, and which other agents it can work with (docs/versioning.md).

Four numbers, each for a different reader:

- `AGENT_VERSION`: the release, `MAJOR.MINOR.PATCH`. Agents whose versions are
  more than one minor version apart (or of another major version) refuse each
  other, naming both versions: a rolling upgrade goes one minor version at a time.
- `STATE_FORMAT`: the newest replicated-state format this agent can apply. Every
  log entry says which format it needs (`"v"`), every snapshot which format it
  holds; an agent that meets a newer one stops applying and says it needs an
  upgrade, and the leader writes nothing newer than every member supports.
- `WIRE_VERSION`: the revision of the gRPC API (`agentd.v1`) this agent speaks.
  Revisions only add fields and methods; the number says which ones a peer knows.
- `DATA_FORMAT`: the layout of the data directory. An agent upgrades an older
  one in place and refuses a newer one.

This module is in the types layer: it imports nothing of agentd, so the CLI can
print it without loading anything heavy. Nor does it import `dataclasses`
(which loads `inspect`, about 12 ms): `Version` and `PeerVersion` are written
out as frozen values (`_Value`), the same as `@dataclass(frozen=True)` made them.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms of `agentd version`)
if TYPE_CHECKING:
    from typing import Any

AGENT_VERSION = "0.2.0"
STATE_FORMAT = 2
WIRE_VERSION = 2
DATA_FORMAT = 2

# What agentd 0.1.0 was, for peers and data directories that predate these numbers (they say nothing).
BASELINE_VERSION = "0.1.0"
BASELINE_STATE_FORMAT = 1
BASELINE_WIRE_VERSION = 1
BASELINE_DATA_FORMAT = 1

# gRPC metadata on the Raft stream an agent opens to a peer: its release.
VERSION_METADATA_KEY = "agentd-version"
SKEW_PHRASE = "more than one minor version apart"
# In every refusal of a join for its version, so the joiner can tell it from a passing failure and stop.
UPGRADE_PHRASE = "cannot join: "


class _Value:
    """A frozen value, as `@dataclass(frozen=True)` makes one: equal (and hashed) by its fields in order,
    `Name(field=value, ...)` as repr, and no field can be assigned after construction."""

    _fields: tuple[str, ...] = ()

    def _init(self, *values: Any) -> None:
        for name, value in zip(self._fields, values, strict=True):
            object.__setattr__(self, name, value)

    def _key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        return self._key() == other._key() if other.__class__ is self.__class__ else NotImplemented  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self._fields)})"


class Version(_Value):
    """A release number, ordered as (major, minor, patch)."""

    _fields = __match_args__ = ("major", "minor", "patch")
    major: int
    minor: int
    patch: int

    def __init__(self, major: int, minor: int, patch: int) -> None:
        self._init(major, minor, patch)

    def __lt__(self, other: object) -> bool:
        return self._key() < other._key() if other.__class__ is self.__class__ else NotImplemented  # type: ignore[attr-defined]

    def __le__(self, other: object) -> bool:
        return self._key() <= other._key() if other.__class__ is self.__class__ else NotImplemented  # type: ignore[attr-defined]

    def __gt__(self, other: object) -> bool:
        return self._key() > other._key() if other.__class__ is self.__class__ else NotImplemented  # type: ignore[attr-defined]

    def __ge__(self, other: object) -> bool:
        return self._key() >= other._key() if other.__class__ is self.__class__ else NotImplemented  # type: ignore[attr-defined]

    @classmethod
    def parse(cls, text: str) -> Version:
        """`1.2.3`, optionally with a suffix (`0.2.0+dev`, `0.2.0rc1`); ValueError otherwise."""
        core = text.strip().split("+", 1)[0]
        parts = core.split(".")
        if len(parts) != 3:
            raise ValueError(f"not a version: {text!r} (expected MAJOR.MINOR.PATCH)")
        nums = []
        for p in parts:
            digits = ""
            for ch in p:
                if not ch.isdigit():
                    break
                digits += ch
            if not digits or len(digits) > 6:
                raise ValueError(f"not a version: {text!r} (expected MAJOR.MINOR.PATCH)")
            nums.append(int(digits))
        return cls(*nums)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def incompatibility(mine: str, theirs: str) -> str:
    """Why an agent of version `mine` must not work with a peer of version `theirs`; "" when it may.

    The rule: same major version, and minor versions at most one apart (either way), as Kubernetes allows
    between its control plane and kubelets. A version that does not parse is refused too.
    """
    try:
        a, b = Version.parse(mine), Version.parse(theirs)
    except ValueError as exc:
        return f"the peer's version is unreadable: {exc}"
    if a.major != b.major or abs(a.minor - b.minor) > 1:
        return (f"this agent runs agentd {a}, the peer runs agentd {b}: agents {SKEW_PHRASE} cannot work "
                "together; upgrade one minor version at a time (docs/operations.md, 'Upgrades')")
    return ""


def info() -> dict[str, object]:
    """The numbers `agentd version --json` prints."""
    return {"version": AGENT_VERSION, "state_format": STATE_FORMAT, "wire_version": WIRE_VERSION,
            "data_format": DATA_FORMAT}


class PeerVersion(_Value):
    """What an agent says of itself in its reports. The defaults are agentd 0.1.0's, which says nothing."""

    _fields = __match_args__ = ("version", "state_format", "wire_version", "upgrade_required")
    version: str
    state_format: int
    wire_version: int
    upgrade_required: str  # why it stopped applying the replicated state

    def __init__(self, version: str = BASELINE_VERSION, state_format: int = BASELINE_STATE_FORMAT,
                 wire_version: int = BASELINE_WIRE_VERSION, upgrade_required: str = "") -> None:
        self._init(version, state_format, wire_version, upgrade_required)

    @classmethod
    def reported(cls, version: str = "", state_format: int = 0, wire_version: int = 0,
                 upgrade_required: str = "") -> PeerVersion:
        """From a message's fields, where empty or 0 means the sender predates them."""
        return cls(version or BASELINE_VERSION, state_format or BASELINE_STATE_FORMAT,
                   wire_version or BASELINE_WIRE_VERSION, upgrade_required)

    def __str__(self) -> str:
        return f"agentd {self.version}, state format {self.state_format}"


THIS_AGENT = PeerVersion(AGENT_VERSION, STATE_FORMAT, WIRE_VERSION)
