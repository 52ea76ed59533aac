"""The plugin is installed and wired: exo's loader finds it through its entry point."""

from exo_core.testing import check_registration


def test_registration():
    check_registration("tailscale", discovery=["tailscale"], hooks=["register_discovery"])
