"""agentd runtime plugin package."""
