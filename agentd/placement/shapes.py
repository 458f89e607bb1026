"""Layout shapes: what a runtime can run, before any GPU is chosen.

A runtime plugin proposes shapes in its order of preference
(`agentd_propose`); the core finds GPUs for each in turn. Two families cover
the runtimes we know:

* `Sharded` - every GPU holds an equal share (vLLM, SGLang): tensor parallel
  `tp` inside a host, pipeline parallel `pp` stages, either all on one host
  (`hosts == 1`) or one stage per host (`hosts == pp`, TP = GPUs per host).
  A sharded shape may ask for GPUs joined by one kind of link (`link="nvlink"`:
  every pair of its GPUs connected by NVLink; `"pcie"`: every pair by PCIe
  only), which the host inventories' `gpu_links` tell. Such a shape is a
  preference, not a rule: the runtime proposes the plain shape too, and a
  linked shape that does not fit is not a rejection the diagnosis counts.
* `LayerSplit` - whole layers spread over the main server's GPUs and remote
  rpc-servers in proportion to their memory (llama.cpp / llama-box), with
  `partial` offload leaving the first layers in the main host's RAM.
"""

from agentd.plugins.api import LayerSplit, Link, Shape, ShapeLimits, Sharded  # noqa: F401 (moved to the plugin API)
