"""The plugin loader: built-ins and entry points through the same hooks; broken plugins are skipped.

The example outside plugin (tests/fixtures/exo-hello-plugin) is built and installed with pip,
as its author would, but into a directory of its own put on the PYTHONPATH of the `exo`
processes: the shared environment never changes.
"""

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from exo_core import plugins
from exo_core.engines.dummy import DummyEngine
from exo_core.hookspecs import hookimpl


def make_dist(root, name, module_source, *, module="exo_fake_plugin"):
    """An installed distribution (dist-info + module) that importlib.metadata finds on sys.path."""
    (root / f"{module}.py").write_text(textwrap.dedent(module_source))
    info = root / f"{module}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[exo]\n{name} = {module}\n")


@pytest.fixture
def fresh_plugins(monkeypatch):
    plugins.reset_for_tests()
    yield monkeypatch
    plugins.reset_for_tests()
    for mod in [m for m in sys.modules if m.startswith("exo_fake")]:
        del sys.modules[mod]
    importlib.invalidate_caches()


def test_builtins_and_installed_plugins_are_listed(fresh_plugins):
    names = {r.name: r for r in plugins.plugin_records()}
    for builtin in ("dummy", "builtin_models", "partitioning", "discovery_builtin", "frontend"):
        assert names[builtin].builtin and names[builtin].error is None
    for plugin in ("tinygrad", "mlx", "rkllm", "tailscale"):
        assert not names[plugin].builtin and names[plugin].version
    assert names["dummy"].hooks == ["register_engines"]


def test_loading_is_idempotent(fresh_plugins):
    plugins.load_plugins()
    before = len(plugins.pm.get_plugins())
    plugins.load_plugins()
    assert len(plugins.pm.get_plugins()) == before
    assert plugins.registry() is plugins.registry()


def test_disable_plugins_env(fresh_plugins):
    fresh_plugins.setenv("EXO_DISABLE_PLUGINS", "tinygrad, dummy")
    names = {r.name for r in plugins.plugin_records()}
    assert "tinygrad" not in names and "dummy" not in names
    assert "mlx" in names
    assert "dummy" not in plugins.registry().engines


def test_broken_plugin_is_recorded_and_skipped(fresh_plugins, tmp_path):
    make_dist(tmp_path, "broken", "raise RuntimeError('this plugin is broken on purpose')\n")
    fresh_plugins.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    records = {r.name: r for r in plugins.plugin_records()}
    assert "broken on purpose" in records["broken"].error
    assert records["broken"].version == "0.3"
    assert "dummy" in plugins.registry().engines  # the rest still works


def test_misspelled_hook_fails_loudly(fresh_plugins, tmp_path):
    make_dist(
        tmp_path,
        "typo",
        """
        from exo_core.hookspecs import hookimpl

        @hookimpl
        def register_engine(register):
            pass
        """,
        module="exo_fake_typo",
    )
    fresh_plugins.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    records = {r.name: r for r in plugins.plugin_records()}
    assert "register_engine" in records["typo"].error
    assert "typo" not in {name for name, _ in plugins.pm.list_name_plugin()}


def test_hooks_register_through_callbacks(fresh_plugins):
    import click

    from exo_core import EMBEDDED, Discovery, ModelCard

    class Other(DummyEngine):
        name = "other"

    class Pigeon(Discovery):
        name = "carrier-pigeon"

        async def start(self):
            pass

        async def stop(self):
            pass

    class Gopher:
        name = "gopher"

        def __init__(self, runtime):
            self.runtime = runtime

        async def start(self):
            pass

        async def stop(self):
            pass

    class Plugin:
        @hookimpl
        def register_engines(self, register):
            register(Other)

        @hookimpl
        def register_discovery(self, register):
            register("carrier-pigeon", Pigeon)

        @hookimpl
        def register_partitioners(self, register):
            register("everything-on-me", lambda nodes, model_id, n_layers: [])

        @hookimpl
        def register_frontends(self, register):
            register("gopher", Gopher)

        @hookimpl
        def register_models(self, register):
            register(ModelCard("smollm2-135m", "again", 30, {"mlx": "some/repo"}))
            register(ModelCard("tiny", "Tiny", 2, {"gguf": EMBEDDED}))

        @hookimpl
        def register_commands(self, cli):
            cli.add_command(click.Command("ping", callback=lambda: click.echo("pong")))

    plugins.load_plugins()
    plugins.pm.register(Plugin(), name="inline")
    reg = plugins.registry()
    assert reg.engines["other"] is Other and "dummy" in reg.engines
    assert reg.discovery["carrier-pigeon"] is Pigeon
    assert {"ring-memory-weighted", "everything-on-me"} <= set(reg.partitioners)
    assert reg.frontends["gopher"] is Gopher
    assert reg.models["tiny"].n_layers == 2
    # A second registration of a card adds sources instead of replacing the card.
    assert reg.models["smollm2-135m"].sources["mlx"] == "some/repo"
    assert reg.models["smollm2-135m"].sources["gguf"] == EMBEDDED

    from click.testing import CliRunner

    from exo_core.cli import build_cli

    assert CliRunner().invoke(build_cli(), ["ping"]).output == "pong\n"


def test_registrations_that_break_their_protocol_are_refused_naming_the_plugin(fresh_plugins):
    from exo_core import InferenceEngine

    class Half(InferenceEngine):  # no forward_batch, no release
        name = "half"

        async def load(self, shard, model):
            pass

    class Sloppy:
        @hookimpl
        def register_engines(self, register):
            register(Half)
            register(object)

        @hookimpl
        def register_discovery(self, register):
            register("carrier-pigeon", object)

        @hookimpl
        def register_partitioners(self, register):
            register("no-args", lambda: [])

        @hookimpl
        def register_frontends(self, register):
            register("gopher", object)

        @hookimpl
        def register_models(self, register):
            register({"id": "not-a-card"})

    class Crashing:
        @hookimpl
        def register_models(self, register):
            raise RuntimeError("boom")

    plugins.load_plugins()
    plugins.pm.register(Sloppy(), name="sloppy")
    plugins.pm.register(Crashing(), name="crashing")
    reg = plugins.registry()
    assert "half" not in reg.engines and "carrier-pigeon" not in reg.discovery
    assert "no-args" not in reg.partitioners and "gopher" not in reg.frontends
    assert "dummy" in reg.engines and "smollm2-135m" in reg.models  # the rest still counts
    records = {r.name: r for r in plugins.plugin_records()}
    error = records["sloppy"].error or ""
    assert "plugin 'sloppy'" in error
    assert "does not implement forward_batch, release" in error
    assert "must be a subclass of exo_core.Discovery" in error
    assert "partitioner 'no-args'" in error and "frontend 'gopher'" in error
    assert "wants ModelCard objects" in error
    assert "register_models raised RuntimeError: boom" in (records["crashing"].error or "")


def test_every_hook_has_a_test():
    """Like datasette's check: each hook in hookspecs.py is exercised by some test."""
    from pathlib import Path

    from exo_core import hookspecs

    hooks = {n for n in dir(hookspecs) if n.startswith("register_")}
    assert len(hooks) == 6
    tests = Path(__file__).parent
    plugin_tests = tests.parent / "plugins"
    text = "".join(p.read_text() for d in (tests, plugin_tests) for p in d.rglob("*.py"))
    untested = sorted(
        h for h in hooks if f"def {h}(" not in text.replace("def " + h + "(self", "def " + h + "(")
    )
    assert not untested, f"hooks without a test implementation: {untested}"


# ---- an outside plugin, installed as its author would ------------------------------------------

HELLO = Path(__file__).parent / "fixtures" / "exo-hello-plugin"
HELLO_ANSWER = re.compile(r"(\w+)! You sent me (\d+) tokens\. This is the exo hello plugin\.")


@pytest.fixture(scope="module")
def hello_site(tmp_path_factory):
    """(source copy, install dir) of exo-hello-plugin: `pip install --target` builds it from its
    pyproject (entry point, dist-info) without touching the shared environment."""
    root = tmp_path_factory.mktemp("hello-plugin")
    src, site = root / "src", root / "site"
    shutil.copytree(HELLO, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    out = subprocess.run([*pip, "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return src, site


def with_hello(site, *args, cwd=None, timeout=120):
    """A subprocess (python ARGS) that sees the installed example plugin."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def test_outside_plugin_is_found_through_its_entry_point(hello_site, fresh_plugins):
    _, site = hello_site
    out = with_hello(site, "-m", "exo_core", "plugins", "--json")
    assert out.returncode == 0, out.stderr
    listed = {r["name"]: r for r in json.loads(out.stdout)}
    assert listed["hello"]["version"] == "0.0.1" and listed["hello"]["error"] is None
    assert listed["hello"]["hooks"] == ["register_commands", "register_engines", "register_models"]
    assert with_hello(site, "-m", "exo_core", "hello").stdout.strip() == "hello from exo-hello-plugin"
    models = {c["id"] for c in json.loads(with_hello(site, "-m", "exo_core", "models", "--json").stdout)}
    assert "hello-smol" in models
    # This process does not see it: nothing was installed into the shared environment.
    assert "hello" not in {r.name for r in plugins.plugin_records()}


def test_outside_engine_answers_exo_run(hello_site):
    _, site = hello_site
    out = with_hello(site, "-m", "exo_core", "run", "--engine", "hello", "--prompt", "Hi")
    assert out.returncode == 0, out.stderr
    answer = HELLO_ANSWER.fullmatch(out.stdout.strip())
    assert answer is not None, out.stdout
    assert answer.group(1) == "Hello" and int(answer.group(2)) > 1  # the chat-templated prompt
    args = ["run", "hello-smol", "--engine", "hello", "--hello-greeting", "Bonjour", "--prompt", "Hi"]
    greeted = with_hello(site, "-m", "exo_core", *args)
    assert greeted.returncode == 0, greeted.stderr
    assert greeted.stdout.strip() == out.stdout.strip().replace("Hello", "Bonjour", 1)


def test_outside_plugins_own_tests_pass(hello_site):
    """The example's tests (engine contract suite, a node in-process, registration), as its author runs them."""
    src, site = hello_site
    out = with_hello(site, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=src, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]


def test_the_plugin_guide_quotes_the_example_as_it_is():
    """docs/plugins.md quotes the example plugin's files; a change to either must reach both."""
    guide = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:python|toml)\n(.*?)```", guide, flags=re.S)
    for name in ("pyproject.toml", "exo_hello/__init__.py", "tests/test_hello.py"):
        assert (HELLO / name).read_text(encoding="utf-8") in blocks, (
            f"the guide does not quote {name} in full"
        )
    engine = (HELLO / "exo_hello" / "engine.py").read_text(encoding="utf-8")
    quoted = [b for b in blocks if "class HelloEngine" in b or "def _forward_batch" in b]
    assert len(quoted) == 2
    for block in quoted:
        assert block in engine, f"the guide's engine code is not in engine.py:\n{block[:300]}"
