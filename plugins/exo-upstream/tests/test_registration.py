"""The plugin is installed and wired: exo's loader finds it through its entry point."""

from exo_core.testing import check_registration


def test_registration():
    found = check_registration("upstream", engines=["upstream"], hooks=["register_engines"])
    assert not found.engines["upstream"].supports_sharding
