"""`agentd serve`'s entry: get a certificate first if told to join with a token, then run one agent."""

from __future__ import annotations

import asyncio
import logging
import os

from agentd.agent.wiring import Daemon
from agentd.config import Settings
from agentd.logs import fields

log = logging.getLogger(__name__)


def join_with_token(settings: Settings) -> Settings:
    """`serve --join ADDR --token TOKEN` on a host without a certificate: get one first.

    Returns the settings with the members' addresses (from the signer's
    answer) added in front of --join, so the Raft join goes to peer ports.
    """
    from agentd.api.join_client import join_cluster, node_addresses

    result = join_cluster(settings.join_token.get_secret_value(), settings.join, tls_dir=settings.tls_directory,
                          node_name=settings.node_name, addresses=node_addresses(settings))
    join = list(dict.fromkeys([*result.peers, *settings.join]))
    log.info("joined with a token; joining the cluster", extra=fields(node=settings.node_name, signer=result.signer,
                                                                      peers=list(result.peers)))
    return settings.model_copy(update={"join": join})


def run_daemon(settings: Settings) -> int:
    """Run one agent until SIGTERM/SIGINT (or SIGUSR2, for a restart). Returns the exit code."""
    async def main() -> int:
        s = settings
        if not s.insecure and s.join_token.get_secret_value() and not (s.tls_directory / "node.crt").exists():
            s = await asyncio.to_thread(join_with_token, s)
        return await Daemon(s).run()  # built inside the loop: grpc.aio and asyncio objects bind to it

    os.umask(0o077)  # what agentd and its model servers create is the agentd user's alone, whatever the caller's umask

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 130
