"""Serving: the OpenAI-compatible HTTP server (`herd serve`), its continuous batcher and media decoding."""
