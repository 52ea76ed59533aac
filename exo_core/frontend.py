"""API frontends: servers a node starts beside the peer service (the OpenAI-compatible API is one)."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = ["Frontend"]


@runtime_checkable
class Frontend(Protocol):
    """A frontend class is constructed with the started node's `exo_core.Runtime` and started once.

    From the runtime a frontend uses `runtime.generator` (prepare and stream text requests),
    `runtime.node` (the cluster, for status pages), `runtime.registry.models` and
    `runtime.config` (its listen address). `stop` is called once, also after a failed start.
    """

    name: ClassVar[str]

    def __init__(self, runtime: Any) -> None: ...  # exo_core.Runtime (not imported: no cycle)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
