"""Speculative decoding: proposers of draft tokens (n-gram, suffix, draft model), their settings and policy."""
