"""integrations: adapters between attnkit and other libraries (docs/huggingface.md)."""
