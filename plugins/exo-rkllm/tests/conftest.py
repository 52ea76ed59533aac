"""Fixtures: the stand-in RKLLAMA server on loopback and exo runtimes bridged to it."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from exo_rkllm.fake_server import FakeRKLLAMA

from exo_core.testing import quiet_logs

# Test modules import rkllm_helpers by name (pytest's importlib mode puts nothing on sys.path).
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def _plain_logs():
    # exo's own console logging (plain tracebacks): structlog's default renders rich tracebacks,
    # which take seconds for each engine error the node logs.
    quiet_logs()


@pytest.fixture(autouse=True)
def _isolated_exo_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EXO_HOME", str(tmp_path / "exo-home"))
    monkeypatch.delenv("RKLLM_SERVER_HOST", raising=False)
    monkeypatch.delenv("RKLLM_SERVER_PORT", raising=False)


@pytest.fixture(params=["fork", "upstream"])
def dialect(request) -> str:
    return request.param


@pytest.fixture
async def server(dialect) -> AsyncIterator[FakeRKLLAMA]:
    from rkllm_helpers import FAST

    async with FakeRKLLAMA(dialect=dialect, **FAST) as fake:
        yield fake
