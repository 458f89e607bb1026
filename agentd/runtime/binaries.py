"""Finding the runtime binaries: the configured path, then known install places, then PATH.

Resolution happens when specs are built, so a missing binary becomes a FATAL
instance whose reason lists every place that was searched, never a silent
fallback to some other program.
"""

from agentd.plugins.api import find_binary  # noqa: F401 (moved to the plugin API)
