"""Settings for every test under this repository (core and plugins)."""

import pytest


@pytest.fixture(autouse=True)
def _no_background_warming(monkeypatch):
    # Nodes started by tests do not build every graph in the background (minutes of CPU on a
    # cold EXO_HOME); tests of warming turn it on themselves.
    monkeypatch.setenv("EXO_WARM", "0")
