"""Hook specifications for runtime plugins (entry-point group `agentd.plugins`).

The phases follow the Kubernetes scheduling framework: *describe* what a
runtime offers, *declare* its constraints and memory needs, *propose / filter
/ score* layouts, then *act* on processes. Placement hooks are synchronous and
pure: they get a frozen snapshot and return values, never touching the network
or the disk. Process hooks may be async.

Rules for evolving this file: specs only ever gain arguments (pluggy passes
only the arguments an implementation names, so old plugins keep working), and
every hook is documented in docs/plugins.md (a test checks this).
"""

from __future__ import annotations

import pluggy

PROJECT = "agentd"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- describe


@hookspec
def agentd_runtime():
    """Describe the runtime this plugin provides, if any.

    Return an `agentd.plugins.RuntimeInfo` (name, model formats served,
    description), or None for a plugin that only adds constraints to other
    runtimes. Runtime names are unique across loaded plugins.
    """


# --------------------------------------------------------------------------- declare, propose, filter, score
# (placement phase: synchronous and pure; see agentd/placement and docs/placement.md)


# --------------------------------------------------------------------------- act
# (process phase: launch, health and stop of the processes a runtime starts; see agentd/runtime)
