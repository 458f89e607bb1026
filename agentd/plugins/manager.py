"""Loads runtime plugins from entry points and calls their hooks.

A plugin that fails to import or register is reported by name and skipped:
one broken third-party package must not stop a daemon that serves models
with the others. Two checks at load make a plugin's mistakes loud instead of
silent: its declared plugin API version (`AGENTD_PLUGIN_API`, the rule in
agentd.plugins.api.API_VERSION), and pluggy's `check_pending()`, which refuses
an implementation of a hook that does not exist (a misspelled hook would
otherwise never be called).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy
from pluggy import PluginValidationError

from agentd.errors import InvalidInput, PluginError
from agentd.logs import fields
from agentd.plugins import hookspecs
from agentd.plugins.api import API_VERSION, RuntimeInfo
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
            check_api_version(ep.name, getattr(obj, "AGENTD_PLUGIN_API", None), required=True)
            self._register_checked(obj, ep.name)
        except Exception as exc:  # any failure in third-party code: report, skip, go on
            msg = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
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

    def _register_checked(self, obj: Any, name: str) -> None:
        """Register `obj`, then refuse it (unregistered again) if it implements a hook that does not exist.

        Every plugin registered before passed the same check, so what check_pending finds is this one's.
        """
        self.pm.register(obj, name=name)
        try:
            self.pm.check_pending()
        except PluginValidationError:
            unknown = sorted(c.name for c in self.pm.get_hookcallers(obj) or () if not c.has_spec())
            self.pm.unregister(obj, name=name)
            raise PluginError(f"plugin {name!r} implements unknown hook(s) {', '.join(unknown)}: not in agentd's "
                              f"plugin API {API_VERSION} (misspelled? the hooks are in docs/plugins.md)") from None

    def register(self, obj: Any, name: str, version: str = "") -> None:
        """Register an in-process plugin object (tests, embedding); the same checks as for entry points,
        except that a declared API version is optional here."""
        check_api_version(name, getattr(obj, "AGENTD_PLUGIN_API", None), required=False)
        self._register_checked(obj, name)
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

    def installed_runtimes(self, settings: Any) -> dict[str, str]:
        """Runtime name -> version of each runtime whose program this host has (agentd_installed).

        A plugin whose hook fails is logged and left out (its runtime is then not reported installed on this
        host); the others still answer."""
        out: dict[str, str] = {}
        for impl in self.pm.hook.agentd_installed.get_hookimpls():  # one by one: a failure costs only its own
            try:
                got = impl.function(**{a: settings for a in impl.argnames if a == "settings"})
            except Exception as exc:  # third-party code: report, go on
                log.warning("plugin failed to say whether its runtime is installed", extra=fields(
                    plugin=impl.plugin_name, error=f"{type(exc).__name__}: {exc}"))
                continue
            if got is not None:
                out[got.name] = got.version
        return dict(sorted(out.items()))

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


def check_api_version(plugin: str, declared: object, *, required: bool) -> None:
    """Refuse a plugin written for another major version of the plugin API; warn about a newer minor.

    The rule (docs/plugins.md, "Versioning"): minor versions only add, so a plugin for 1.0 runs on an
    agentd offering 1.3; a plugin for 1.4 may rely on something 1.3 lacks, so it loads with a warning; a
    plugin for 2.x (or an agentd of 2.x with a plugin for 1.x) is refused.
    """
    if declared is None:
        if required:
            raise PluginError(f"plugin {plugin!r} declares no plugin API version (set AGENTD_PLUGIN_API = "
                              f"\"{API_VERSION}\" in the module its entry point names)")
        return
    ours = _parse_version(API_VERSION)
    theirs = _parse_version(declared) if isinstance(declared, str) else None
    if theirs is None:
        raise PluginError(f"plugin {plugin!r} declares plugin API version {declared!r}, "
                          f"not \"MAJOR.MINOR\" (this agentd offers {API_VERSION})")
    if theirs[0] != ours[0]:
        raise PluginError(f"plugin {plugin!r} was written for plugin API {declared}, this agentd offers "
                          f"{API_VERSION}: the major versions differ; install a release of the plugin for "
                          f"API {ours[0]}.x")
    if theirs[1] > ours[1]:
        log.warning("plugin written for a newer plugin API; loaded, but what it relies on from the newer "
                    "minor version is missing", extra=fields(plugin=plugin, plugin_api=declared, api=API_VERSION))


def _parse_version(text: str) -> tuple[int, int] | None:
    major, dot, minor = text.partition(".")
    if not (dot and major.isdigit() and minor.isdigit()):
        return None
    return int(major), int(minor)


def _new_pm() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm
