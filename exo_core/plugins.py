"""Plugin loading: one idempotent loader, built-ins registered through the same hooks."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from exo_core import hookspecs

if TYPE_CHECKING:
    from exo_core.engine import InferenceEngine
    from exo_core.models.cards import ModelCard

ENTRY_POINT_GROUP = "exo"

# Built-in pieces, registered exactly like third-party plugins: name in `exo plugins` -> module.
DEFAULT_PLUGINS: dict[str, str] = {
    "dummy": "exo_core.engines.dummy",
    "builtin_models": "exo_core.models.builtin",
    "partitioning": "exo_core.node.partitioning",
    "discovery_builtin": "exo_core.networking.discovery_builtin",
    "frontend": "exo_core.api.frontend",
}

pm = pluggy.PluginManager("exo")
pm.add_hookspecs(hookspecs)


@dataclass
class PluginRecord:
    """What `exo plugins` shows about one plugin."""

    name: str
    version: str | None
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    error: str | None = None


_loaded = False
_records: dict[str, PluginRecord] = {}
_registry: Registry | None = None


def disabled_plugins() -> set[str]:
    """Names blocked by EXO_DISABLE_PLUGINS=a,b."""
    raw = os.environ.get("EXO_DISABLE_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def load_plugins() -> None:
    """Load built-in and installed plugins once; a plugin that fails to import is recorded, not fatal."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    blocked = disabled_plugins()
    core_version = _dist_version("exo-core")
    for short, module_name in DEFAULT_PLUGINS.items():
        if short in blocked:
            continue
        _register(short, module_name, core_version, builtin=True)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in blocked or ep.name in _records:
            continue
        version = ep.dist.version if ep.dist is not None else None
        _register(ep.name, ep.value, version, builtin=False, entry_point=ep)
    if os.environ.get("EXO_TRACE_PLUGINS"):
        pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
        pm.enable_tracing()


def _register(
    name: str,
    target: str,
    version: str | None,
    *,
    builtin: bool,
    entry_point: importlib.metadata.EntryPoint | None = None,
) -> None:
    record = PluginRecord(name=name, version=version, builtin=builtin)
    _records[name] = record
    try:
        module = entry_point.load() if entry_point is not None else importlib.import_module(target)
        pm.register(module, name=name)
    except Exception as exc:  # a broken plugin must never take exo down
        record.error = f"{type(exc).__name__}: {exc}"
        return
    try:
        pm.check_pending()  # a misspelled hook name: loud in `exo plugins`, not fatal
    except pluggy.PluginValidationError as exc:
        pm.unregister(module, name=name)
        record.error = f"PluginValidationError: {exc}"
        return
    record.hooks = sorted(impl.__name__ for impl in _hook_functions(module))


def _hook_functions(module: Any) -> list[Any]:
    names = {caller.name for caller in pm.get_hookcallers(module) or []}
    return [getattr(module, n) for n in names]


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def plugin_records() -> list[PluginRecord]:
    """Every plugin seen by the loader, built-ins first, with its hooks or its load error."""
    load_plugins()
    return list(_records.values())


@dataclass
class Registry:
    """Everything plugins registered, collected once from the hooks (a typed facade over pm.hook)."""

    engines: dict[str, type[InferenceEngine]] = field(default_factory=dict)
    discovery: dict[str, type] = field(default_factory=dict)
    partitioners: dict[str, Any] = field(default_factory=dict)
    frontends: dict[str, type] = field(default_factory=dict)
    models: dict[str, ModelCard] = field(default_factory=dict)


def registry() -> Registry:
    """The collected registrations of all loaded plugins."""
    global _registry
    if _registry is not None:
        return _registry
    load_plugins()
    reg = Registry()

    def engine(cls: type[InferenceEngine]) -> None:
        reg.engines[cls.name] = cls

    def named(target: dict[str, Any]):
        def register(name: str, obj: Any) -> None:
            target[name] = obj

        return register

    def model(card: ModelCard) -> None:
        existing = reg.models.get(card.id)
        reg.models[card.id] = existing.merged_with(card) if existing else card

    pm.hook.register_engines(register=engine)
    pm.hook.register_discovery(register=named(reg.discovery))
    pm.hook.register_partitioners(register=named(reg.partitioners))
    pm.hook.register_frontends(register=named(reg.frontends))
    pm.hook.register_models(register=model)
    _registry = reg
    return reg


def reset_for_tests() -> None:
    """Forget everything loaded, so a test can load plugins again under another environment."""
    global _loaded, _registry
    for name, plugin in list(pm.list_name_plugin()):
        pm.unregister(plugin, name=name)
    _records.clear()
    _loaded = False
    _registry = None
