"""Constrained decoding: a grammar per request, compiled once, turned into a token bitmask for the sampler."""
