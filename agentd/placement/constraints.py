"""Declared constraints and the rejections they give.

A runtime plugin declares its rules as constraint objects (`agentd_constraints`);
the core checks every candidate against all of them and explains each
rejection. A constraint checks at one or more levels, from cheapest to
most specific, and the core calls only the levels a constraint overrides:

* `check_static()` - the request itself (e.g. max_model_len > the model's);
* `check_device(gpu)` - one GPU, before any layout (e.g. free memory);
* `check_shape(shape)` - a layout shape, before GPUs are chosen (e.g. TP divides heads);
* `check_layout(layout)` - a concrete candidate (e.g. the main server holds a layer).

Each returns None (fine) or a `Rejection`. Rejections are grouped by
(subject, reason), so `reason` must be stable text; the numbers go in
`detail` (human) and `details` (machine). Constraints are plain objects,
called in the hot loop: keep them cheap and free of I/O.

The classes here are the rules several runtimes share; a plugin may use
them, subclass `Constraint`, or pass any object with these methods.
"""

from agentd.plugins.api import (  # noqa: F401 (moved to the plugin API)
    Constraint,
    MinFreeFraction,
    MinLayersOnMain,
    PipelineStages,
    QuantGroupAlignment,
    Rejection,
    TensorParallelDivisibility,
    layout_rejection,
)
