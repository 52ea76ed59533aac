"""The plugin is installed and wired: exo's loader finds it through its entry point."""

from exo_core.plugins import plugin_records


def test_plugin_is_listed_without_error():
    records = {r.name: r for r in plugin_records()}
    name = "tailscale"
    assert name in records, sorted(records)
    assert records[name].error is None
    assert records[name].version
