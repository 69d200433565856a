"""Prompt lookup: propose the tokens that followed the sequence's last n tokens where they last occurred before."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(token_ids: np.ndarray, min_n: int, max_n: int, num_tokens: int) -> list[int]:
    """Up to `num_tokens` drafts for a sequence of prompt + output tokens (int array); [] when nothing matches.

    The longest n in [min_n, max_n] wins; among the earlier occurrences of the last n tokens the latest one is
    used, and the drafts are the tokens after it (at most up to the end of the sequence).
    """
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = token_ids[length - n :]
        # Windows starting at 0 .. length-n-1: every occurrence except the suffix itself.
        windows = sliding_window_view(token_ids[: length - 1], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return token_ids[start : start + num_tokens].tolist()
    return []
