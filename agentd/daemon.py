"""`agentd serve`: one agent. The code lives in `agentd.agent` (see its package docstring for which module
does what); this module keeps the names outside code imported from here."""

from __future__ import annotations

from agentd.agent.http import Provider as _Provider
from agentd.agent.identity import NODE_CLAIMS, check_secure_addresses, tls_identity
from agentd.agent.main import join_with_token, run_daemon
from agentd.agent.reconciler import RECONCILE_PERIOD
from agentd.agent.reporter import REPORT_INTERVAL, STATE_ORDER, part_reports
from agentd.agent.wiring import EXIT_RAFT_FAILED, Daemon

__all__ = ["EXIT_RAFT_FAILED", "NODE_CLAIMS", "RECONCILE_PERIOD",
           "REPORT_INTERVAL", "STATE_ORDER", "Daemon", "_Provider", "check_secure_addresses", "join_with_token",
           "part_reports", "run_daemon", "tls_identity"]
