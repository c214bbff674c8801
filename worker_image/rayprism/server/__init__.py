"""The OpenAI-compatible HTTP server (`rayprism serve`)."""
