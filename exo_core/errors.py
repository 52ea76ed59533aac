"""Errors that cross module and plugin boundaries; each message is written for the user."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["OUT_OF_MEMORY", "ConfigError", "EngineError", "ErrorCode", "PluginError"]


class ErrorCode(StrEnum):
    """What kind of failure an `EngineError` is, for the code that decides what to do about it
    (the message is for people and may say anything). It crosses the network beside the message."""

    # A KV cache that does not fit in free memory was refused: temporary, the origin answers 503.
    OUT_OF_MEMORY = "out_of_memory"
    # A stage does not hold the request's cache at the position it was sent (a prefix evicted,
    # a node restarted): the origin reruns the request from scratch.
    POSITION_MISMATCH = "position_mismatch"


# What an engine's message says when it refuses a KV cache that does not fit in free memory.
# An engine should raise `EngineError(message, code=ErrorCode.OUT_OF_MEMORY)`; a stage still
# takes an `EngineError` without a code whose message says this for one (engines written before
# codes), and sends the code on.
OUT_OF_MEMORY = "not enough free memory"


class ConfigError(ValueError):
    """A setting the user chose cannot work; the message names the choices."""


class EngineError(RuntimeError):
    """An engine failed in a way the user should hear about (bad file, server down, ...).

    `code` (an `ErrorCode` value, or its string: "out_of_memory", ...) says what kind of failure
    it is when the cluster should treat it specially; None for any other failure.
    """

    def __init__(self, *args: object, code: str | None = None) -> None:
        super().__init__(*args)
        self.code = ErrorCode(code) if code is not None and code in ErrorCode else code


class PluginError(TypeError):
    """A plugin registered something that does not implement its protocol; names the plugin."""
