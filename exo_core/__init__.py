"""exo-core: hooks, node, partitioning, peer protocol, discovery, API, CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("exo-core")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
