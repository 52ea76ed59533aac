"""Fixtures: real llama.cpp servers (llama-cpp-python's OpenAI-compatible server) on loopback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Test modules import upstream_helpers by name (pytest's importlib mode puts nothing on sys.path).
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _isolated_exo_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EXO_HOME", str(tmp_path / "exo-home"))
    monkeypatch.delenv("EXO_UPSTREAM_API_KEY", raising=False)
