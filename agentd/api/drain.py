"""Stop with or without this host's model servers: the contract between systemd, the operator and `agentd serve`.

By default SIGTERM (systemctl stop / restart) stops agentd alone: model
servers keep serving, and the next start adopts them (the unit uses
KillMode=process). To take the host out of service instead, the operator
asks for its model servers to stop too; on SIGTERM the daemon then sends
STOPPING=1, stops every instance it runs (SIGTERM, grace, SIGKILL, per the
runtime supervisor) and only then exits. Two ways to ask, both read at
SIGTERM time, not at start:

* the file `<data_dir>/stop-models-on-exit` (one stop; the daemon removes it
  once done, so the next restart keeps them again), e.g.
  `touch /var/lib/agentd/stop-models-on-exit && systemctl stop agentd`;
* the setting `stop_models_on_exit = true` (`AGENTD_STOP_MODELS_ON_EXIT=1` in
  /etc/agentd/agentd.env): every stop stops them.

This is not `agentd drain`, which moves a host's replicas to other hosts
before anything stops (docs/operations.md): the two were both called "drain"
before 0.2.0, and the old names (`drain_on_stop`, the file `drain-on-stop`)
still work, with a deprecation warning for the setting.

A restart never stops them: the unit sets RestartKillSignal=SIGUSR2, and the
daemon treats SIGUSR2 as "exit for a restart" whatever was asked (an upgrade
or `systemctl restart` must not take the host's models down).
"""

from __future__ import annotations

from pathlib import Path

from agentd.security.files import private_dir, touch_private

DRAIN_FILE = "stop-models-on-exit"
OLD_DRAIN_FILE = "drain-on-stop"  # before 0.2.0; still honoured


def drain_file(data_dir: Path) -> Path:
    return Path(data_dir) / DRAIN_FILE


def _requests(data_dir: Path) -> list[Path]:
    return [p for p in (drain_file(data_dir), Path(data_dir) / OLD_DRAIN_FILE) if p.exists()]


def drain_decision(data_dir: Path, stop_models: bool, *, restarting: bool = False) -> tuple[bool, str]:
    """Whether this stop stops the model servers, and the sentence to log. `restarting`: the signal was SIGUSR2."""
    if restarting:
        return False, "exiting for a restart: model servers keep running and are adopted"
    if stop_models:
        return True, "stopping this host's model servers before exit: stop_models_on_exit is set"
    if asked := _requests(data_dir):
        return True, f"stopping this host's model servers before exit: {asked[0]} exists"
    return False, "exiting; model servers keep running and are adopted on the next start"


def request_drain(data_dir: Path) -> Path:
    path = drain_file(data_dir)
    private_dir(path.parent)
    touch_private(path)
    return path


def clear_drain_request(data_dir: Path) -> None:
    """Called once the model servers stopped, so that the following start-stop cycle keeps them again."""
    drain_file(data_dir).unlink(missing_ok=True)
    (Path(data_dir) / OLD_DRAIN_FILE).unlink(missing_ok=True)
