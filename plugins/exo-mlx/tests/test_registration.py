"""The plugin is installed and wired: exo's loader finds it, without importing mlx."""

from exo_core.testing import check_lazy_imports, check_registration


def test_registration():
    found = check_registration(
        "mlx", engines=["mlx"], hooks=["register_engines"], lazy_modules=["mlx"], lazy_available=False
    )
    assert found.engines["mlx"].supports_sharding


def test_available_does_not_import_mlx():
    check_lazy_imports(["mlx"], engines=["mlx"])
