"""The OpenAI-compatible HTTP server, its metrics and the browser chat page."""
