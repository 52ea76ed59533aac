"""Reading checkpoint files (GGUF, safetensors) and the Llama-family config they describe."""
