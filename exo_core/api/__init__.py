"""The OpenAI-compatible API frontend and web chat page."""
