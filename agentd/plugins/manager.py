"""Loads runtime plugins from entry points and calls their hooks.

A plugin that fails to import or register is reported by name and skipped:
one broken third-party package must not stop a daemon that serves models
with the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from agentd.errors import InvalidInput, PluginError
from agentd.logs import fields
from agentd.plugins import hookspecs
from agentd.plugins.api import RuntimeInfo
from agentd.plugins.reserved import CORE, ReservedLaunch, check_launch_options
from agentd.types import DeploymentSpec

ENTRY_POINT_GROUP = "agentd.plugins"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedPlugin:
    name: str
    distribution: str
    version: str


@dataclass(frozen=True)
class PluginFailure:
    name: str
    error: str


@dataclass
class PluginManager:
    """A pluggy manager plus what loading found: plugins, failures, runtimes."""

    pm: pluggy.PluginManager = field(default_factory=lambda: _new_pm())
    loaded: list[LoadedPlugin] = field(default_factory=list)
    failures: list[PluginFailure] = field(default_factory=list)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    @classmethod
    def load(
        cls,
        allow: list[str] | None = None,
        disable: list[str] | None = None,
        entry_points_: list[EntryPoint] | None = None,
    ) -> PluginManager:
        """Load every `agentd.plugins` entry point, honouring allow/deny lists."""
        mgr = cls()
        eps = entry_points_ if entry_points_ is not None else list(entry_points(group=ENTRY_POINT_GROUP))
        disable_set = set(disable or [])
        for ep in sorted(eps, key=lambda e: e.name):
            if allow is not None and ep.name not in allow:
                continue
            if ep.name in disable_set:
                log.info("plugin disabled by configuration", extra=fields(plugin=ep.name))
                continue
            mgr._load_one(ep)
        return mgr

    def _load_one(self, ep: EntryPoint) -> None:
        try:
            obj = ep.load()
            self.pm.register(obj, name=ep.name)
        except Exception as exc:  # any failure in third-party code: report, skip, go on
            msg = f"{type(exc).__name__}: {exc}"
            self.failures.append(PluginFailure(ep.name, msg))
            log.warning("plugin failed to load; skipped", extra=fields(plugin=ep.name, error=msg))
            return
        dist = ep.dist
        self.loaded.append(
            LoadedPlugin(
                name=ep.name,
                distribution=dist.name if dist else "",
                version=dist.version if dist else "",
            )
        )

    def register(self, obj: Any, name: str, version: str = "") -> None:
        """Register an in-process plugin object (tests, embedding)."""
        self.pm.register(obj, name=name)
        self.loaded.append(LoadedPlugin(name=name, distribution="", version=version))

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.loaded = [p for p in self.loaded if p.name != name]

    def runtimes(self) -> dict[str, RuntimeInfo]:
        out: dict[str, RuntimeInfo] = {}
        for info in self._call_safely("agentd_runtime"):
            if info is None:
                continue
            if info.name in out:
                raise PluginError(f"two plugins provide the runtime {info.name!r}")
            out[info.name] = info
        return out

    def runtime(self, name: str) -> RuntimeInfo:
        runtimes = self.runtimes()
        if name not in runtimes:
            known = ", ".join(sorted(runtimes)) or "none loaded"
            raise InvalidInput(f"unknown runtime {name!r} (available: {known})")
        return runtimes[name]

    def reserved_launch(self, runtime: str) -> ReservedLaunch:
        """What only agentd may set for `runtime`: agentd's own list and every plugin's declaration."""
        return ReservedLaunch.merge([CORE, *self._call_safely("agentd_reserved_launch", runtime=runtime)])

    def check_launch_options(self, spec: DeploymentSpec) -> None:
        """InvalidInput naming the first extra argument or variable of `spec` that only agentd may set."""
        check_launch_options(spec.runtime, spec.options.extra_args, spec.options.env,
                             self.reserved_launch(spec.runtime))

    def _call_safely(self, hook_name: str, **kwargs: Any) -> list[Any]:
        try:
            return getattr(self.pm.hook, hook_name)(**kwargs)
        except Exception as exc:
            raise PluginError(f"hook {hook_name} failed: {type(exc).__name__}: {exc}") from exc


def _new_pm() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm
