"""The plugin API: hook specifications and the manager that loads runtime plugins."""

from agentd.plugins.hookspecs import hookimpl, hookspec
from agentd.plugins.manager import PluginManager, RuntimeInfo
from agentd.plugins.reserved import ReservedLaunch

__all__ = ["PluginManager", "ReservedLaunch", "RuntimeInfo", "hookimpl", "hookspec"]
