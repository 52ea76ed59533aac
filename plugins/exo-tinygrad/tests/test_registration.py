"""The plugin is installed and wired: exo's loader finds it, without importing tinygrad."""

import json
import os
import platform
import subprocess
import sys

from exo_core.plugins import plugin_records, registry
from exo_core.runtime import choose_engine


def test_plugin_is_listed_without_error():
    records = {r.name: r for r in plugin_records()}
    name = "tinygrad"
    assert name in records, sorted(records)
    assert records[name].error is None
    assert records[name].version
    assert "register_engines" in records[name].hooks


def test_engine_is_registered_and_available():
    engine = registry().engines["tinygrad"]
    assert engine.name == "tinygrad" and engine.supports_sharding
    assert engine.available() == (True, "")
    assert engine.default_priority() >= 50 or platform.system() == "Darwin"


def test_default_engine_on_linux():
    if platform.system() != "Linux":
        return
    assert choose_engine(registry(), None).name == "tinygrad"


def test_listing_plugins_does_not_import_tinygrad():
    code = (
        "import sys, json; from exo_core.plugins import plugin_records, registry; "
        "plugin_records(); registry().engines['tinygrad'].available(); "
        "print(json.dumps('tinygrad' in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) is False
