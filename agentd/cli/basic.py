"""Subcommands about agentd itself: version, config, plugins."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from agentd.cli.common import emit

if TYPE_CHECKING:
    from agentd.plugins import PluginManager

PLUGIN_GROUP = "agentd.plugins"  # agentd.plugins.manager.ENTRY_POINT_GROUP, without importing pluggy


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("version", parents=parents, help="print the version of agentd and its plugins",
                       description="Print the version of agentd and of each installed plugin (from the "
                       "package metadata; the plugins are not loaded: 'agentd plugins' loads them).")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("config", parents=parents, help="inspect the configuration",
                       description="Inspect the effective configuration.")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True,
                            parser_class=type(p))
    s = csub.add_parser("show", parents=parents, help="print the effective configuration",
                        description="Print the effective configuration: defaults < TOML file "
                        "(/etc/agentd/agentd.toml or $AGENTD_CONFIG) < AGENTD_* environment.")
    s.set_defaults(func=cmd_config_show)

    p = sub.add_parser("plugins", parents=parents, help="list loaded runtime plugins",
                       description="List the plugins loaded from the agentd.plugins entry points, "
                       "and any that failed to load.")
    p.set_defaults(func=cmd_plugins)


def load_plugins() -> PluginManager:
    from agentd.config import load_settings
    from agentd.plugins import PluginManager

    settings = load_settings()
    return PluginManager.load(allow=settings.plugins, disable=settings.disable_plugins)


def installed_plugins() -> list[dict[str, str]]:
    """Each `agentd.plugins` entry point with its distribution's name and version, sorted by name.

    Read from the package metadata only: importing a plugin costs time (and may fail), and
    `agentd version` must answer at once, whatever is installed.
    """
    from importlib.metadata import entry_points

    out = []
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        dist = ep.dist
        out.append({"name": ep.name, "distribution": dist.name if dist else "",
                    "version": dist.version if dist else "", "api": declared_plugin_api(dist)})
    return out


def declared_plugin_api(dist: Any) -> str:
    """The plugin API version a distribution declares in its metadata: the keyword `agentd-plugin-api=1.0`
    (docs/plugins.md, "Versioning"); "" when it declares none."""
    if dist is None:
        return ""
    for line in dist.metadata.get_all("Keywords") or ():
        for word in line.replace(",", " ").split():
            if word.startswith("agentd-plugin-api="):
                return word.partition("=")[2]
    return ""


def version_info() -> dict[str, Any]:
    """What `agentd version --json` prints: {"version": ..., ..., "plugins": [...]}.

    Keys come from agentd.version.info() (the release, state format, wire version); "agentd" repeats the
    release for scripts written against agentd 0.1.0.
    """
    from agentd.version import info  # it imports nothing of agentd: cheap

    data: dict[str, Any] = info()
    data["agentd"] = data["version"]
    data["plugins"] = installed_plugins()
    return data


def cmd_version(args: argparse.Namespace) -> int:
    data = version_info()
    emit(args, data, lambda: "\n".join(
        [f"agentd {data['version']} (state format {data['state_format']}, wire version {data['wire_version']}, "
         f"data format {data['data_format']})"]
        + [f"  plugin {p['name']} {p['version']}" + (f" (plugin API {p['api']})" if p["api"] else "")
           for p in data["plugins"]]))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from agentd.config import config_path, load_settings

    settings = load_settings()
    data = json.loads(settings.model_dump_json())
    source = str(config_path()) if config_path().is_file() else None

    def human() -> str:
        lines = [f"# config file: {source or 'none'}"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in data.items()]
        return "\n".join(lines)

    emit(args, {"config_file": source, "settings": data}, human)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    mgr = load_plugins()
    runtimes = mgr.runtimes()
    data = {
        "plugins": [
            {"name": p.name, "distribution": p.distribution, "version": p.version,
             "runtime": p.name in runtimes}
            for p in mgr.loaded
        ],
        "failed": [{"name": f.name, "error": f.error} for f in mgr.failures],
        "runtimes": {name: {"formats": list(r.formats), "description": r.description}
                     for name, r in runtimes.items()},
    }

    def human() -> str:
        lines = [f"{'NAME':<14} {'VERSION':<10} FORMATS"]
        for p in mgr.loaded:
            r = runtimes.get(p.name)
            lines.append(f"{p.name:<14} {p.version:<10} {','.join(r.formats) if r else '-'}")
        lines += [f"FAILED {f.name}: {f.error}" for f in mgr.failures]
        return "\n".join(lines)

    emit(args, data, human)
    return 0
