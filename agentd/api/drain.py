"""Stop with or without draining: the contract between systemd, the operator and `agentd serve`.

By default SIGTERM (systemctl stop / restart) stops agentd alone: model
servers keep serving, and the next start adopts them (the unit uses
KillMode=process). To take the host out of service instead, the operator
asks for a drain before stopping; on SIGTERM the daemon then sends
STOPPING=1, stops every instance it runs (SIGTERM, grace, SIGKILL, per the
runtime supervisor) and only then exits. Two ways to ask, both read at
SIGTERM time, not at start:

* the file `<data_dir>/drain-on-stop` (one stop; the daemon removes it once the
  drain is done, so the next restart does not drain again), e.g.
  `touch /var/lib/agentd/drain-on-stop && systemctl stop agentd`;
* the setting `drain_on_stop = true` (`AGENTD_DRAIN_ON_STOP=1` in
  /etc/agentd/agentd.env): every stop drains.

A restart never drains: the unit sets RestartKillSignal=SIGUSR2, and the
daemon treats SIGUSR2 as "exit for a restart" whatever was asked (an upgrade
or `systemctl restart` must not take the host's models down).
"""

from __future__ import annotations

from pathlib import Path

from agentd.security.files import private_dir, touch_private

DRAIN_FILE = "drain-on-stop"


def drain_file(data_dir: Path) -> Path:
    return Path(data_dir) / DRAIN_FILE


def drain_decision(data_dir: Path, drain_on_stop: bool, *, restarting: bool = False) -> tuple[bool, str]:
    """Whether this stop drains, and the sentence to log. `restarting`: the signal was SIGUSR2."""
    if restarting:
        return False, "exiting for a restart without draining: model servers keep running and are adopted"
    if drain_on_stop:
        return True, "draining before exit: drain_on_stop is set"
    if drain_file(data_dir).exists():
        return True, f"draining before exit: {drain_file(data_dir)} exists"
    return False, "exiting without draining: model servers keep running and are adopted on the next start"


def request_drain(data_dir: Path) -> Path:
    path = drain_file(data_dir)
    private_dir(path.parent)
    touch_private(path)
    return path


def clear_drain_request(data_dir: Path) -> None:
    """Called after a completed drain, so that the following start-stop cycle does not drain again."""
    drain_file(data_dir).unlink(missing_ok=True)
