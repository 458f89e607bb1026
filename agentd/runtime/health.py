"""Readiness and liveness probes.

Each HTTP probe opens its own connection with its own short timeout and
closes it: a pooled keep-alive connection would queue the probe behind
inference traffic, and a server busy generating would look dead. Busy is not
dead, so liveness fails only after `failures` probes in a row failed (or the
process is gone), never on one slow answer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from agentd.runtime.spec import HealthVerdict, HttpProbe, ProbeResult, TcpProbe

_MAX_HEADER = 16 * 1024
_MAX_BODY = 512


async def probe_http(probe: HttpProbe, timeout: float) -> ProbeResult:
    host = probe.host if probe.host not in ("0.0.0.0", "") else "127.0.0.1"
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, probe.port)
            writer.write(
                f"GET {probe.path} HTTP/1.1\r\nHost: {host}:{probe.port}\r\nConnection: close\r\n"
                f"User-Agent: agentd-probe\r\nAccept: */*\r\n\r\n".encode()
            )
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > _MAX_HEADER:
                return ProbeResult(ok=False, error="oversized HTTP header")
            status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or not parts[1].isdigit():
                return ProbeResult(ok=False, error=f"not HTTP: {status_line[:80]!r}")
            status = int(parts[1])
            body = b""
            try:
                body = await reader.read(_MAX_BODY)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            return ProbeResult(ok=200 <= status < 300, status=status, body=body.decode("utf-8", "replace"))
    except TimeoutError:
        return ProbeResult(ok=False, timed_out=True, error=f"no answer from {host}:{probe.port} within {timeout:g}s")
    except asyncio.IncompleteReadError:
        return ProbeResult(ok=False, error=f"{host}:{probe.port} closed the connection without an HTTP answer")
    except OSError as exc:
        return ProbeResult(ok=False, error=f"cannot connect to {host}:{probe.port}: {exc.strerror or exc}")
    finally:
        if writer is not None:
            writer.close()


async def probe_tcp(host: str, port: int, timeout: float) -> ProbeResult:
    host = host if host not in ("0.0.0.0", "") else "127.0.0.1"
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
        writer.close()
        return ProbeResult(ok=True)
    except TimeoutError:
        return ProbeResult(ok=False, timed_out=True, error=f"no TCP answer from {host}:{port} within {timeout:g}s")
    except OSError as exc:
        return ProbeResult(ok=False, error=f"cannot connect to {host}:{port}: {exc.strerror or exc}")


async def run_probe(probe: HttpProbe | TcpProbe, timeout: float) -> ProbeResult:
    if isinstance(probe, HttpProbe):
        return await probe_http(probe, timeout)
    return await probe_tcp(probe.host, probe.port, timeout)


def default_verdict(result: ProbeResult) -> HealthVerdict:
    """Without a plugin's reading: 2xx is ready, anything else counts as a failure."""
    return HealthVerdict(ready=result.ok, alive=result.ok, detail=result.detail)


@dataclass
class Liveness:
    """Consecutive liveness failures; `record` says when the limit is reached."""

    failures_allowed: int = 3
    consecutive: int = 0
    last_detail: str = ""

    def record(self, verdict: HealthVerdict) -> bool:
        """Count one probe; True when the process must be considered dead."""
        if verdict.ready or verdict.alive:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.last_detail = verdict.detail
        return self.consecutive >= self.failures_allowed
