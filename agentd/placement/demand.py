"""Memory estimates a runtime plugin returns from `agentd_estimate`, one per shape family."""

from agentd.plugins.api import Demand, LayerDemand, ShardDemand  # noqa: F401 (moved to the plugin API)
