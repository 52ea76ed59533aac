"""Where exo keeps things on disk (EXO_HOME), and the error for model files that are not there.

The bottom of the models package: `files` (finding files) and `download` (fetching them) both
build on it, so neither imports the other at module level.
"""

from __future__ import annotations

import os
from pathlib import Path


class ModelFilesError(FileNotFoundError):
    """A model's files are not on this node; the message says what to install or download."""


def exo_home() -> Path:
    """EXO_HOME, default ~/.cache/exo: node identity, downloaded models."""
    return Path(os.environ.get("EXO_HOME") or Path.home() / ".cache" / "exo")


def models_dir() -> Path:
    return exo_home() / "models"
