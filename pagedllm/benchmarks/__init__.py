"""Benchmarks against real peers: `pagedllm bench serve | offline | peers | report`.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`.
"""
