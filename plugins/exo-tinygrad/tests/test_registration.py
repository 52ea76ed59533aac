"""The plugin is installed and wired: exo's loader finds it, without importing tinygrad."""

import platform

import pytest

from exo_core.testing import check_registration, default_engine


def test_registration():
    found = check_registration(
        "tinygrad", engines=["tinygrad"], hooks=["register_engines"], lazy_modules=["tinygrad"]
    )
    engine = found.engines["tinygrad"]
    assert engine.supports_sharding and engine.available() == (True, "")
    assert engine.default_priority() >= 50 or platform.system() == "Darwin"


@pytest.mark.skipif(platform.system() != "Linux", reason="the default engine on Linux")
def test_default_engine_on_linux():
    assert default_engine() == "tinygrad"
