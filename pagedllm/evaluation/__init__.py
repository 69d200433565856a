"""Model quality measured through the engine: perplexity on held-out text."""
