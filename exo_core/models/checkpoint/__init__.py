"""Reading checkpoint files (GGUF, safetensors) and the Llama-family config they describe.

Engines turn what these readers hand them (metadata, shapes, memory-mapped bytes) into their
own tensors; finding and downloading the files is `exo_core.models.files`.
"""

from exo_core.models.checkpoint.config import (
    GGUF_PERMUTED_QK,
    LLAMA_FAMILY,
    LlamaConfig,
    llama3_rope_factors,
    read_hf_checkpoint,
    read_hf_config,
    read_llama_config,
)
from exo_core.models.checkpoint.errors import CheckpointError
from exo_core.models.checkpoint.gguf import (
    GGML_TYPES,
    GGUFFile,
    GGUFFormatError,
    GGUFTensor,
    ggml_type_name,
    read_gguf,
    read_gguf_metadata,
)
from exo_core.models.checkpoint.identity import file_identity
from exo_core.models.checkpoint.names import (
    GGUF,
    GLOBAL_MODULES,
    HF,
    LAYER_MODULES,
    Format,
    module_name,
    module_of,
    shard_modules,
    shard_tensors,
    to_gguf,
    to_hf,
)
from exo_core.models.checkpoint.safetensors import (
    SafetensorsCheckpoint,
    SafetensorsFile,
    SafetensorsTensor,
    read_safetensors_header,
)

__all__ = [
    "GGML_TYPES",
    "GGUF",
    "GGUF_PERMUTED_QK",
    "GLOBAL_MODULES",
    "HF",
    "LAYER_MODULES",
    "LLAMA_FAMILY",
    "CheckpointError",
    "Format",
    "GGUFFile",
    "GGUFFormatError",
    "GGUFTensor",
    "LlamaConfig",
    "SafetensorsCheckpoint",
    "SafetensorsFile",
    "SafetensorsTensor",
    "file_identity",
    "ggml_type_name",
    "llama3_rope_factors",
    "module_name",
    "module_of",
    "read_gguf",
    "read_gguf_metadata",
    "read_hf_checkpoint",
    "read_hf_config",
    "read_llama_config",
    "read_safetensors_header",
    "shard_modules",
    "shard_tensors",
    "to_gguf",
    "to_hf",
]
