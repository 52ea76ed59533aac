"""The error every checkpoint reader raises: a file exo cannot read, and why."""

from __future__ import annotations

from exo_core.errors import EngineError


class CheckpointError(EngineError):
    """A checkpoint file is missing, cut short, corrupt, or describes a model exo cannot run.

    The message starts with the file's path and says what is wrong with it.
    """
