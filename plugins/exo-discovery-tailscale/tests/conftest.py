"""Each test gets its own EXO_HOME: nodes keep their cluster key there."""

import pytest


@pytest.fixture(autouse=True)
def _isolated_exo_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EXO_HOME", str(tmp_path / "exo-home"))
