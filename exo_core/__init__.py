"""exo-core: hooks, node, partitioning, peer protocol, discovery, API, CLI.

The names in `__all__` are the public API: what a plugin may import, from `exo_core` itself
(`from exo_core import InferenceEngine, hookimpl`). Everything in submodules is private to
core and may change in any release; `exo_core.testing` is the public test kit for plugin
authors. From 1.0 on the public API follows semantic versioning (see the README).

Names are imported on first use, so `import exo_core` stays cheap (the CLI starts fast).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("exo-core")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # plugins and hooks
    "hookimpl": "exo_core.hookspecs",
    "PluginError": "exo_core.errors",
    "ConfigError": "exo_core.errors",
    # engines
    "InferenceEngine": "exo_core.engine",
    "StageInput": "exo_core.engine",
    "TextStageInput": "exo_core.engine",
    "TextEngine": "exo_core.engine",
    "TextGeneration": "exo_core.engine",
    "TextDelta": "exo_core.engine",
    "ToolCall": "exo_core.engine",
    "ReplicaUnavailable": "exo_core.engine",
    "UpstreamError": "exo_core.engine",
    "StageOutput": "exo_core.engine",
    "EngineThread": "exo_core.engine",
    "Progress": "exo_core.engine",
    "EngineError": "exo_core.errors",
    "ErrorCode": "exo_core.errors",
    "SamplingParams": "exo_core.node.sampling",
    # models
    "Shard": "exo_core.models.shard",
    "ModelCard": "exo_core.models.cards",
    "EMBEDDED": "exo_core.models.cards",
    "DEFAULT_MODEL_ID": "exo_core.models.cards",
    "ModelFilesError": "exo_core.models.files",
    "embedded_gguf_path": "exo_core.models.files",
    "shard_checkpoint": "exo_core.models.files",
    "exo_home": "exo_core.models.files",
    "Tokenizer": "exo_core.models.tokenizer",
    "TokenizerError": "exo_core.models.tokenizer",
    "load_tokenizer": "exo_core.models.tokenizer",
    # discovery, topology, partitioning
    "Discovery": "exo_core.discovery",
    "DiscoveryContext": "exo_core.discovery",
    "PeerSink": "exo_core.discovery",
    "DeviceCapabilities": "exo_core.node.topology",
    "NodeInfo": "exo_core.node.topology",
    "is_rk3588": "exo_core.node.topology",
    "Partitioner": "exo_core.node.partitioning",
    "PlanStage": "exo_core.node.partitioning",
    "NoPlanError": "exo_core.node.partitioning",
    # frontends
    "Frontend": "exo_core.frontend",
    "Runtime": "exo_core.runtime",
    "NodeConfig": "exo_core.runtime",
    "GenerationError": "exo_core.node.messages",
}

# public submodules: the checkpoint readers (GGUF, safetensors, Llama-family config, tensor names)
_MODULES: dict[str, str] = {"checkpoint": "exo_core.checkpoint"}

__all__ = [
    "DEFAULT_MODEL_ID",
    "EMBEDDED",
    "ConfigError",
    "DeviceCapabilities",
    "Discovery",
    "DiscoveryContext",
    "EngineError",
    "EngineThread",
    "ErrorCode",
    "Frontend",
    "GenerationError",
    "InferenceEngine",
    "ModelCard",
    "ModelFilesError",
    "NoPlanError",
    "NodeConfig",
    "NodeInfo",
    "Partitioner",
    "PeerSink",
    "PlanStage",
    "PluginError",
    "Progress",
    "ReplicaUnavailable",
    "Runtime",
    "SamplingParams",
    "Shard",
    "StageInput",
    "StageOutput",
    "TextDelta",
    "TextEngine",
    "TextGeneration",
    "TextStageInput",
    "Tokenizer",
    "TokenizerError",
    "ToolCall",
    "UpstreamError",
    "__version__",
    "checkpoint",
    "embedded_gguf_path",
    "exo_home",
    "hookimpl",
    "is_rk3588",
    "load_tokenizer",
    "shard_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        module_value = importlib.import_module(_MODULES[name])
        globals()[name] = module_value
        return module_value
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'exo_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from exo_core import checkpoint
    from exo_core.discovery import Discovery, DiscoveryContext, PeerSink
    from exo_core.engine import (
        EngineThread,
        InferenceEngine,
        Progress,
        ReplicaUnavailable,
        StageInput,
        StageOutput,
        TextDelta,
        TextEngine,
        TextGeneration,
        TextStageInput,
        ToolCall,
        UpstreamError,
    )
    from exo_core.errors import ConfigError, EngineError, ErrorCode, PluginError
    from exo_core.frontend import Frontend
    from exo_core.hookspecs import hookimpl
    from exo_core.models.cards import DEFAULT_MODEL_ID, EMBEDDED, ModelCard
    from exo_core.models.files import ModelFilesError, embedded_gguf_path, exo_home, shard_checkpoint
    from exo_core.models.shard import Shard
    from exo_core.models.tokenizer import Tokenizer, TokenizerError, load_tokenizer
    from exo_core.node.messages import GenerationError
    from exo_core.node.partitioning import NoPlanError, Partitioner, PlanStage
    from exo_core.node.sampling import SamplingParams
    from exo_core.node.topology import DeviceCapabilities, NodeInfo, is_rk3588
    from exo_core.runtime import NodeConfig, Runtime
