"""Cluster identity and access: the CA, node and admin certificates, join tokens, API keys, mutual TLS.

The pure parts (certificate issuing, token and key stores) take their clock and
randomness as arguments, so the daemon can run them inside the replicated
state machine and every node reaches the same decision.
"""
