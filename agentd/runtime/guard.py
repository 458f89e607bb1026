"""The instance guard's place in a launch: which processes get it, and with what policy.

In a secure cluster (the assignment carries an instance key) every process of an instance starts with
agentd/security/guard.c preloaded, so it and all its children (Ray's raylet and workers, vLLM's and SGLang's
worker processes) accept TCP connections only from the instance's own hosts: the addresses of its parts'
endpoints, plus 127.0.0.1 and ::1. The serving endpoint (the main part's endpoint, which agentd's proxy on any
host reaches, behind the instance key) stays open to everyone in the process that listens on it. Nothing in a
plugin declares this: the supervisor derives it from the assignment and the spec's `listen`.

127.0.0.1 rather than 127.0.0.0/8: a local connection to any loopback address leaves from 127.0.0.1 unless it
binds another, so the hosts of a test cluster on loopback aliases (127.0.0.2, 127.0.0.3) stay told apart.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

from agentd.errors import RuntimeFailure
from agentd.plugins.api import ProcessSpec
from agentd.security import guard
from agentd.types import Assignment

LOCAL = ("127.0.0.1", "::1")
REQUIRED, OFF = "required", "off"


@dataclass(frozen=True)
class Policy:
    library: str
    allow: tuple[str, ...]  # addresses whose connections pass
    serving_part: int  # the part whose endpoint is the instance's serving endpoint
    serving_port: int

    def env(self, spec: ProcessSpec, inherited: str) -> dict[str, str]:
        """What `spec`'s process gets; `inherited` is the LD_PRELOAD it would have had (kept, after ours)."""
        serves = (spec.part_index == self.serving_part and spec.listen is not None
                  and spec.listen.port == self.serving_port)
        return {"LD_PRELOAD": " ".join(x for x in (self.library, inherited) if x),
                guard.ALLOW_ENV: ",".join(self.allow),
                guard.OPEN_PORTS_ENV: str(self.serving_port) if serves else ""}


async def policy(a: Assignment, mode: str, also: tuple[str, ...] = ()) -> Policy | None:
    """The instance's policy, or None where the guard does not apply (insecure cluster, or `mode` off).

    `also`: addresses or CIDR blocks every instance lets in (the setting instance_guard_allow).

    RuntimeFailure, with what to do, when it is required and cannot be had."""
    if mode == OFF or not a.api_key:
        return None
    try:
        library = await asyncio.to_thread(guard.library)
    except guard.Unavailable as exc:
        raise RuntimeFailure(
            f"the instance guard is required in a secure cluster and is unavailable here: {exc}; install a C "
            "compiler and run scripts/bootstrap (or python -m agentd.security.guard), or set instance_guard = "
            '"off" to run instances without it') from None
    allow: list[str] = [*LOCAL, *also]
    for e in a.endpoints:
        for addr in await _addresses(e.address):
            if addr not in allow:
                allow.append(addr)
    main = next((i for i, p in enumerate(a.plan.parts) if p.role == "main"), 0)
    return Policy(library=str(library), allow=tuple(allow), serving_part=main, serving_port=a.endpoints[main].port)


async def _addresses(host: str) -> list[str]:
    """`host`'s IP addresses: itself when it is one, else what the resolver says now; without a zone (`%eth0`),
    which the guard's parser does not take and a peer's address never carries."""
    try:
        return [str(ipaddress.ip_address(host)).split("%")[0]]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise RuntimeFailure(f"the instance guard cannot resolve the instance's host {host!r}: {exc}") from None
    return sorted({str(info[4][0]).split("%")[0] for info in infos})
