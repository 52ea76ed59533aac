"""Plugin loading: one idempotent loader, built-ins registered through the same hooks."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy
import structlog

from exo_core import hookspecs
from exo_core.errors import PluginError

if TYPE_CHECKING:
    from exo_core.discovery import Discovery
    from exo_core.engine import InferenceEngine
    from exo_core.frontend import Frontend
    from exo_core.models.cards import ModelCard
    from exo_core.node.partitioning import Partitioner

log = structlog.get_logger("exo.plugins")

ENTRY_POINT_GROUP = "exo"

# Built-in pieces, registered exactly like third-party plugins: name in `exo plugins` -> module.
DEFAULT_PLUGINS: dict[str, str] = {
    "dummy": "exo_core.engines.dummy",
    "builtin_models": "exo_core.models.builtin",
    "partitioning": "exo_core.node.builtin_partitioners",
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
    discovery: dict[str, type[Discovery]] = field(default_factory=dict)
    partitioners: dict[str, Partitioner] = field(default_factory=dict)
    frontends: dict[str, type[Frontend]] = field(default_factory=dict)
    models: dict[str, ModelCard] = field(default_factory=dict)


def registry() -> Registry:
    """The collected registrations of all loaded plugins.

    Each plugin's hooks are called on their own: a registration that does not implement its
    protocol, or a hook that raises, becomes that plugin's error (shown by `exo plugins`) and
    is skipped; what the other plugins registered still counts.
    """
    global _registry
    if _registry is not None:
        return _registry
    load_plugins()
    from exo_core.models.cards import ModelCard

    reg = Registry()

    def engine(plugin: str, cls: Any) -> None:
        from exo_core.engine import InferenceEngine

        _check_class(plugin, "engine", cls, InferenceEngine)
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r}: engine {cls.__qualname__} has no `name` string")
        reg.engines[name] = cls

    def discovery(plugin: str, name: Any, cls: Any) -> None:
        from exo_core.discovery import Discovery

        _check_name(plugin, "discovery module", name)
        _check_class(plugin, f"discovery module {name!r}", cls, Discovery)
        reg.discovery[name] = cls

    def partitioner(plugin: str, name: Any, fn: Any) -> None:
        _check_name(plugin, "partitioner", name)
        try:
            inspect.signature(fn).bind(None, None, None)
        except (TypeError, ValueError):
            raise PluginError(
                f"plugin {plugin!r}: partitioner {name!r} must be a function (nodes, model_id, n_layers)"
            ) from None
        reg.partitioners[name] = fn

    def frontend(plugin: str, name: Any, cls: Any) -> None:
        _check_name(plugin, "frontend", name)
        methods = ("start", "stop")
        if not isinstance(cls, type) or not all(
            inspect.iscoroutinefunction(getattr(cls, m, None)) for m in methods
        ):
            raise PluginError(
                f"plugin {plugin!r}: frontend {name!r} must be a class with async start() and stop() "
                f"(exo_core.Frontend), got {cls!r}"
            )
        reg.frontends[name] = cls

    def model(plugin: str, card: Any) -> None:
        if not isinstance(card, ModelCard):
            raise PluginError(f"plugin {plugin!r}: register_models wants ModelCard objects, got {card!r}")
        existing = reg.models.get(card.id)
        try:
            reg.models[card.id] = existing.merged_with(card) if existing else card
        except ValueError as exc:
            raise PluginError(f"plugin {plugin!r}: {exc}") from None

    _collect(pm.hook.register_engines, engine)
    _collect(pm.hook.register_discovery, discovery)
    _collect(pm.hook.register_partitioners, partitioner)
    _collect(pm.hook.register_frontends, frontend)
    _collect(pm.hook.register_models, model)
    _registry = reg
    return reg


def _collect(hook: Any, accept: Callable[..., None]) -> None:
    """Call each plugin's implementation of `hook` with a `register` bound to that plugin."""
    for impl in hook.get_hookimpls():
        plugin = impl.plugin_name
        try:
            impl.function(register=functools.partial(accept, plugin))
        except PluginError as exc:
            _plugin_failed(plugin, exc)
        except Exception as exc:  # a plugin's bug must not take exo down
            _plugin_failed(
                plugin, PluginError(f"plugin {plugin!r}: {hook.name} raised {type(exc).__name__}: {exc}")
            )


def _plugin_failed(plugin: str, exc: PluginError) -> None:
    record = _records.setdefault(plugin, PluginRecord(name=plugin, version=None, builtin=False))
    record.error = f"PluginError: {exc}" if record.error is None else f"{record.error}; {exc}"
    log.warning("plugin registration refused", plugin=plugin, error=str(exc))


def _check_name(plugin: str, what: str, name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise PluginError(
            f"plugin {plugin!r}: a {what} is registered as register(name, ...) with a name string"
        )


def _check_class(plugin: str, what: str, cls: Any, base: type) -> None:
    if not isinstance(cls, type) or not issubclass(cls, base):
        raise PluginError(
            f"plugin {plugin!r}: {what} must be a subclass of exo_core.{base.__name__}, got {cls!r}"
        )
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise PluginError(f"plugin {plugin!r}: {what} {cls.__qualname__} does not implement {missing}")


def reset_for_tests() -> None:
    """Forget everything loaded, so a test can load plugins again under another environment."""
    global _loaded, _registry
    for name, plugin in list(pm.list_name_plugin()):
        pm.unregister(plugin, name=name)
    _records.clear()
    _loaded = False
    _registry = None
