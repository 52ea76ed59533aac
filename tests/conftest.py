"""Shared fixtures for exo-core's tests."""

import json
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

# Test modules import core_helpers by name (pytest's importlib mode puts nothing on sys.path).
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def reference():
    """llama.cpp's tokenization and greedy answers for the embedded model (from shared/reference)."""
    return json.loads((DATA / "smollm2-135m-llamacpp.json").read_text(encoding="utf-8"))


@pytest.fixture(autouse=True)
def _isolated_exo_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EXO_HOME", str(tmp_path / "exo-home"))
