"""The public API: `exo_core.__all__` resolves, and plugins use nothing else.

A plugin's package code imports only `from exo_core import ...` (names in `__all__`) and the
public checkpoint readers (`from exo_core.checkpoint import ...`); its tests
may also use the public test kit, `exo_core.testing`. Everything else in exo_core is private and
may move in any release (docs/plugins.md, "Stability"), so an import of it is a bug to fix in the
plugin, or a name to make public.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import exo_core

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = frozenset(exo_core.__all__)
# Public submodules plugin code may import from (`from exo_core.checkpoint import read_gguf`).
PUBLIC_MODULES = frozenset({"exo_core.checkpoint"})


def test_every_public_name_resolves():
    missing = [name for name in exo_core.__all__ if not hasattr(exo_core, name)]
    assert not missing, f"exo_core.__all__ names that do not resolve: {missing}"
    assert len(set(exo_core.__all__)) == len(exo_core.__all__), "a name is listed twice in __all__"
    assert set(dir(exo_core)) >= PUBLIC


def test_unknown_names_are_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Node'"):
        _ = exo_core.Node  # type: ignore[attr-defined]


def _is_testing(module: str) -> bool:
    return module == "exo_core.testing" or module.startswith("exo_core.testing.")


def private_imports(path: Path, *, tests: bool, root: Path = ROOT) -> Iterator[str]:
    """'file:line: statement' for each import of exo_core that is not public (test kit too when `tests`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    where = path.relative_to(root)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                if name.startswith("exo_core.") and not (tests and _is_testing(name)):
                    yield f"{where}:{node.lineno}: import {name}"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            module = node.module
            if module == "exo_core":
                private = sorted(a.name for a in node.names if a.name not in PUBLIC)
                if private and not (tests and private == ["testing"]):
                    yield f"{where}:{node.lineno}: from exo_core import {', '.join(private)} (not in __all__)"
            elif module in PUBLIC_MODULES:
                continue
            elif module.startswith("exo_core.") and not (tests and _is_testing(module)):
                names = ", ".join(a.name for a in node.names)
                yield f"{where}:{node.lineno}: from {module} import {names}"


def _files(pattern: str) -> list[Path]:
    return sorted(p for p in ROOT.glob(pattern) if "egg-info" not in p.parts and "build" not in p.parts)


def _scan(what: str, pattern: str, tests: bool) -> object:
    return pytest.param(what, pattern, tests, id=what)


PLUGINS = sorted(p.name for p in ROOT.glob("plugins/exo-*"))
SCANS = [
    *[_scan(f"{name} package", f"plugins/{name}/exo_*/**/*.py", False) for name in PLUGINS],
    *[_scan(f"{name} tests", f"plugins/{name}/tests/**/*.py", True) for name in PLUGINS],
    # The example plugin is the guide's model: it must stay clean.
    _scan("exo-hello-plugin package", "tests/fixtures/exo-hello-plugin/exo_hello/**/*.py", False),
    _scan("exo-hello-plugin tests", "tests/fixtures/exo-hello-plugin/tests/**/*.py", True),
]


@pytest.mark.parametrize(("what", "pattern", "tests"), SCANS)
def test_plugins_import_only_public_names(what, pattern, tests):
    files = _files(pattern)
    assert files, f"{what}: no files match {pattern}"
    found = [line for path in files for line in private_imports(path, tests=tests)]
    assert not found, f"{what} imports exo_core internals:\n" + "\n".join(found)


def test_the_scan_sees_a_private_import(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "import exo_core\n"
        "from exo_core import Shard, hookimpl\n"
        "from exo_core.testing import chat\n"
        "from exo_core.runtime import NodeConfig\n"
        "import exo_core.plugins\n"
        "from exo_core import plugins\n"
    )
    package = [line.split(": ", 1)[1] for line in _lines(source, tests=False)]
    assert package == [
        "from exo_core.testing import chat",
        "from exo_core.runtime import NodeConfig",
        "import exo_core.plugins",
        "from exo_core import plugins (not in __all__)",
    ]
    assert len(_lines(source, tests=True)) == 3  # the test kit is allowed in tests


def _lines(path: Path, *, tests: bool) -> list[str]:
    return sorted(
        private_imports(path, tests=tests, root=path.parent), key=lambda line: int(line.split(":")[1])
    )
