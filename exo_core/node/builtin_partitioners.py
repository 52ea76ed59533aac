"""Registers the built-in partitioning strategies (through the same hook as plugins)."""

from exo_core.hookspecs import hookimpl
from exo_core.node.partitioning import ring_memory_weighted


@hookimpl
def register_partitioners(register):
    register("ring-memory-weighted", ring_memory_weighted)
