"""Helpers for this plugin's tests: exo nodes bridged to an RKLLAMA server (the stand-in).

The generic parts (a node in-process, one chat through it) are exo's public test kit,
`exo_core.testing`; this module only adds what is about RKLLAMA. Test modules import it by
name: conftest.py puts this directory on sys.path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from exo_core import ModelCard, Runtime
from exo_core.testing import node

# Fast enough that the suite stays short, slow enough that streaming is visible.
FAST = {"tokens_per_second": 500.0, "first_token_ms": 20.0}

CONVERSATION = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "Bonjour ! Qu'est-ce qu'un NPU ?"},
    {"role": "assistant", "content": "Un processeur pour réseaux de neurones."},
    {"role": "user", "content": "Et le RK3588, 日本語で?"},
]


def rkllm_runtime(
    url: str, models: Sequence[ModelCard] = (), *, step_timeout: float = 120.0, **options: Any
) -> contextlib.AbstractAsyncContextManager[Runtime]:
    """A single exo node whose rkllm engine talks to `url` (no API, no discovery); `models` adds cards."""
    return node(
        "rkllm",
        models=models,
        step_timeout=step_timeout,
        engine_options={"rkllm_server": url, **options},
    )
