"""Subcommands about agentd itself: version, config, plugins."""

from __future__ import annotations

import argparse
import json

from agentd.cli.common import emit

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms of `agentd version`)
if TYPE_CHECKING:
    from typing import Any

    from agentd.plugins import PluginManager

PLUGIN_GROUP = "agentd.plugins"  # agentd.plugins.manager.ENTRY_POINT_GROUP, without importing pluggy


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("version", parents=parents, help="print the version of agentd and its plugins",
                       description="Print the version of agentd and of each installed plugin (from the "
                       "package metadata; the plugins are not loaded: 'agentd plugins' loads them).")
    p.set_defaults(func=cmd_version, logs=False)  # it logs nothing: logging is not even imported (start-up time)

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
    `agentd version` must answer at once, whatever is installed. The `*.dist-info` directories on
    sys.path are read directly (`_scan_plugins`): importlib.metadata parses each METADATA file with the
    email package, whose import alone was a third of `agentd version` (issue 16). importlib.metadata
    answers when the scan cannot (metadata of another shape, say in a zip).
    """
    found = _scan_plugins(PLUGIN_GROUP)
    if found is not None:
        return found
    from importlib.metadata import entry_points

    out = []
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        dist = ep.dist
        out.append({"name": ep.name, "distribution": dist.name if dist else "",
                    "version": dist.version if dist else "", "api": declared_plugin_api(dist)})
    return out


def _scan_plugins(group: str) -> list[dict[str, str]] | None:
    """The entry points of `group` from the `*.dist-info` directories on sys.path, the first distribution of
    a name winning (as importlib.metadata does); None when a path entry is not a plain directory."""
    import os
    import re
    import sys

    seen: set[str] = set()
    out: dict[str, dict[str, str]] = {}
    for entry in sys.path:
        path = entry or "."
        if not os.path.isdir(path):
            if os.path.isfile(path):
                return None  # a zip on the path: importlib.metadata reads those
            continue
        try:
            names = sorted(n for n in os.listdir(path) if n.endswith(".dist-info"))
        except OSError:
            continue
        for name in names:
            d = os.path.join(path, name)
            try:
                with open(os.path.join(d, "entry_points.txt"), encoding="utf-8") as f:
                    eps = _entry_points(f.read(), group)
            except OSError:
                eps = []
            headers = _headers(d) if eps else {}
            dist = headers.get("name", [name.partition("-")[0]])[0]
            key = re.sub(r"[-_.]+", "-", dist).lower()
            if key in seen:
                continue
            seen.add(key)
            api = _plugin_api(headers.get("keywords", []))
            version = headers.get("version", [""])[0]
            for ep in eps:
                out.setdefault(ep, {"name": ep, "distribution": dist, "version": version, "api": api})
    return [out[k] for k in sorted(out)]


def _entry_points(text: str, group: str) -> list[str]:
    names, inside = [], False
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            inside = line == f"[{group}]"
        elif inside and "=" in line and not line.startswith(("#", ";")):
            names.append(line.partition("=")[0].strip())
    return names


def _headers(dist_info: str) -> dict[str, list[str]]:
    """Name, Version and Keywords from a METADATA file's header block (lower-case keys)."""
    import os

    out: dict[str, list[str]] = {}
    try:
        with open(os.path.join(dist_info, "METADATA"), encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break  # the body (the long description) follows
                key, sep, value = line.partition(":")
                if sep and key.lower() in ("name", "version", "keywords"):
                    out.setdefault(key.lower(), []).append(value.strip())
    except OSError:
        pass
    return out


def declared_plugin_api(dist: Any) -> str:
    """The plugin API version a distribution declares in its metadata: the keyword `agentd-plugin-api=1.0`
    (docs/plugins.md, "Versioning"); "" when it declares none."""
    if dist is None:
        return ""
    return _plugin_api(dist.metadata.get_all("Keywords") or ())


def _plugin_api(keywords: Any) -> str:
    for line in keywords:
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
