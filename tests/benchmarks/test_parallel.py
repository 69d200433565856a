"""`bench parallel`'s flags."""

from __future__ import annotations

import argparse

from pagedllm.benchmarks import parallel


def test_unknown_part_is_refused_before_anything_runs(capsys):
    parser = argparse.ArgumentParser()
    parallel.add_arguments(parser)
    assert parallel.run(parser.parse_args(["--parts", "tensor,pipeline"])) == 2
    assert "not pipeline" in capsys.readouterr().out
