"""A concrete candidate: which GPUs of which hosts hold what. Built by the core, judged by constraints."""

from agentd.plugins.api import LaunchParams, Layout, PartLayout, Role  # noqa: F401 (moved to the plugin API)
