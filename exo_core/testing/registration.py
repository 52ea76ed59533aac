"""Is a plugin installed and wired? One check for every plugin's `test_registration.py`.

::

    from exo_core.testing import check_registration

    def test_registration():
        check_registration("tinygrad", engines=["tinygrad"], lazy_modules=["tinygrad"])

`check_registration` proves, the way a user would see it:

- the distribution declares the entry point (`[project.entry-points.exo] NAME = "module"`)
  and is installed (`pip install -e .`);
- exo's loader loads it without error, with a version, through the hooks named;
- the engines and discovery modules named are registered, by this plugin;
- `exo plugins --json` (a fresh process) lists it without error;
- listing plugins and calling each engine's `available()` imports none of `lazy_modules`
  (the heavy libraries a plugin must import only when an engine is used).

It raises AssertionError saying what to fix, and returns what it found.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from exo_core.discovery import Discovery
from exo_core.engine import InferenceEngine
from exo_core.models.cards import ModelCard
from exo_core.plugins import ENTRY_POINT_GROUP, plugin_records, registry
from exo_core.runtime import choose_engine

__all__ = [
    "Registration",
    "check_lazy_imports",
    "check_registration",
    "default_engine",
    "engine_class",
    "model_card",
]


@dataclass
class Registration:
    """What the loader knows about one plugin."""

    plugin: str
    module: str  # the entry point's target
    version: str
    hooks: list[str]
    engines: dict[str, type[InferenceEngine]] = field(default_factory=dict)
    discovery: dict[str, type[Discovery]] = field(default_factory=dict)


def check_registration(
    plugin: str,
    *,
    engines: Sequence[str] = (),
    discovery: Sequence[str] = (),
    hooks: Sequence[str] = (),
    lazy_modules: Sequence[str] = (),
    lazy_available: bool = True,
    timeout: float = 120.0,
) -> Registration:
    """Check that `plugin` (its entry-point name) is installed and registers what it should.

    `lazy_modules` are the heavy libraries that neither loading the plugin nor (unless
    `lazy_available=False`) its engines' `available()` may import.
    """
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=plugin)
    assert eps, (
        f"no entry point {plugin!r} in the group {ENTRY_POINT_GROUP!r}: declare "
        f'`[project.entry-points.{ENTRY_POINT_GROUP}] {plugin} = "your_module"` in pyproject.toml '
        "and install the distribution (pip install -e .)"
    )
    (ep,) = tuple(eps)[:1]
    module = ep.value.split(":")[0]

    records = {r.name: r for r in plugin_records()}
    assert plugin in records, f"exo's loader did not load {plugin!r}; it loaded {sorted(records)}"
    record = records[plugin]
    assert record.error is None, f"plugin {plugin!r} failed to load: {record.error}"
    assert record.version, f"plugin {plugin!r} has no version (is its distribution installed?)"
    missing_hooks = sorted(set(hooks) - set(record.hooks))
    assert not missing_hooks, f"plugin {plugin!r} implements {record.hooks}, not {missing_hooks}"

    reg = registry()
    found = Registration(plugin, module, record.version, list(record.hooks))
    for name in engines:
        assert name in reg.engines, f"no engine {name!r} registered; engines: {sorted(reg.engines)}"
        found.engines[name] = _owned(plugin, module, "engine", name, reg.engines[name])
    for name in discovery:
        assert name in reg.discovery, (
            f"no discovery module {name!r} registered; modules: {sorted(reg.discovery)}"
        )
        found.discovery[name] = _owned(plugin, module, "discovery module", name, reg.discovery[name])

    _check_listed_by_cli(plugin, timeout)
    if lazy_modules:
        check_lazy_imports(lazy_modules, engines=engines if lazy_available else (), timeout=timeout)
    return found


def _owned[T](plugin: str, module: str, what: str, name: str, cls: type[T]) -> type[T]:
    package = module.split(".")[0]
    assert cls.__module__ == package or cls.__module__.startswith(package + "."), (
        f"{what} {name!r} is {cls.__module__}.{cls.__qualname__}, not from plugin {plugin!r} ({package})"
    )
    return cls


def _exo(args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exo_core", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
        check=False,
    )


def _check_listed_by_cli(plugin: str, timeout: float) -> None:
    out = _exo(["plugins", "--json"], timeout)
    assert out.returncode == 0, f"`exo plugins --json` failed ({out.returncode}):\n{out.stderr[-3000:]}"
    listed = {r["name"]: r for r in json.loads(out.stdout)}
    assert plugin in listed, f"`exo plugins --json` does not list {plugin!r}: {sorted(listed)}"
    assert listed[plugin]["error"] is None, f"`exo plugins` shows an error: {listed[plugin]['error']}"


_LAZY_PROBE = """
import json, sys
from exo_core.plugins import plugin_records, registry
modules, engines = json.loads(sys.argv[1]), json.loads(sys.argv[2])
plugin_records()
reg = registry()
listed = sorted(m for m in modules if m in sys.modules)
for name in engines:
    reg.engines[name].available()
print(json.dumps([listed, sorted(m for m in modules if m in sys.modules)]))
"""


def check_lazy_imports(
    modules: Sequence[str], *, engines: Sequence[str] = (), timeout: float = 120.0
) -> None:
    """In a fresh process, loading every plugin and collecting their registrations imports none of
    `modules`, and neither does calling `available()` on the `engines` named."""
    out = subprocess.run(
        [sys.executable, "-c", _LAZY_PROBE, json.dumps(list(modules)), json.dumps(list(engines))],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
        check=False,
    )
    assert out.returncode == 0, f"listing plugins failed:\n{out.stderr[-3000:]}"
    listed, checked = json.loads(out.stdout.strip().splitlines()[-1])
    assert not listed, (
        f"loading plugins imported {listed}: import heavy libraries inside the engine's methods, "
        "not at the top of the plugin's modules"
    )
    assert not checked, (
        f"available() of {list(engines)} imported {checked}: look for the library with "
        "importlib.util.find_spec instead of importing it"
    )


def engine_class(name: str) -> type[InferenceEngine]:
    """The engine class registered under `name` (what `exo run --engine NAME` uses)."""
    engines = registry().engines
    if name not in engines:
        raise LookupError(f"no engine {name!r} registered; engines: {sorted(engines)}")
    return engines[name]


def default_engine() -> str:
    """The name of the engine `exo run` picks on this machine when none is named."""
    return choose_engine(registry(), None).name


def model_card(model_id: str) -> ModelCard:
    """The model card registered under `model_id` (with every plugin's sources merged in)."""
    models = registry().models
    if model_id not in models:
        raise LookupError(f"no model card {model_id!r}; cards: {sorted(models)}")
    return models[model_id]
