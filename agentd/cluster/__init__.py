"""Consensus and the replicated desired state: Raft, membership, the cluster state machine."""
