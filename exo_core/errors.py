"""Errors that cross module and plugin boundaries; each message is written for the user."""

from __future__ import annotations

__all__ = ["OUT_OF_MEMORY", "ConfigError", "EngineError", "PluginError"]

# What an engine's message says when it refuses a KV cache that does not fit in free memory: the
# message crosses the network as text, and the origin answers such a failure with 503 (try
# again later) instead of 500.
OUT_OF_MEMORY = "not enough free memory"


class ConfigError(ValueError):
    """A setting the user chose cannot work; the message names the choices."""


class EngineError(RuntimeError):
    """An engine failed in a way the user should hear about (bad file, server down, ...)."""


class PluginError(TypeError):
    """A plugin registered something that does not implement its protocol; names the plugin."""
