"""This host's inventory: GPUs through NVML, RAM and CPUs through psutil, or a simulated file.

Public entry points: `collect_inventory` (one inventory, never raises for GPU
problems), `Collector` (the daemon's collect, built from settings) and
`InventoryRefresher` (periodic refresh in a worker thread, publishing
material changes).
"""

from agentd.inventory.collect import Collector, collect_inventory
from agentd.inventory.nvml import NvmlReader
from agentd.inventory.refresher import InventoryRefresher

__all__ = ["Collector", "InventoryRefresher", "NvmlReader", "collect_inventory"]
