"""The plugin is installed and wired: exo's loader finds it through its entry point."""

from exo_core.testing import check_registration


def test_registration():
    found = check_registration("rkllm", engines=["rkllm"], hooks=["register_engines", "register_models"])
    assert not found.engines["rkllm"].supports_sharding
