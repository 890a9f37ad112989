"""Talking to models: the OpenAI-compatible client, the request journal, the embedded default model."""
