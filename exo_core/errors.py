"""Errors that cross module and plugin boundaries; each message is written for the user."""

from __future__ import annotations

__all__ = ["ConfigError", "EngineError", "PluginError"]


class ConfigError(ValueError):
    """A setting the user chose cannot work; the message names the choices."""


class EngineError(RuntimeError):
    """An engine failed in a way the user should hear about (bad file, server down, ...)."""


class PluginError(TypeError):
    """A plugin registered something that does not implement its protocol; names the plugin."""
