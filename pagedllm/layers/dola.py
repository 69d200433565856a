"""DoLa (Chuang et al. 2023): contrast the final layer's next-token distribution with an early exit's.

Layers are numbered as transformers' `hidden_states`: 0 is the embedding output, i >= 1 the output of decoder layer
i - 1, and the model's layer count N is the final (mature) layer. An early exit is the final norm and the LM head
applied to a premature layer's hidden state. Among the candidate premature layers, the one whose distribution is
farthest from the final one's (Jensen-Shannon divergence) is contrasted: log p_final - log p_premature over the
tokens whose final probability is at least a tenth of the top one's; every other token gets -inf.
"""

from __future__ import annotations

import math

import torch

from pagedllm.errors import InvalidArgumentError

# The adaptive plausibility constraint's alpha: tokens below this fraction of the top final probability are out.
PLAUSIBILITY_ALPHA = 0.1
# Deep models draw each bucket from this many layers at the bottom or the top, every other one.
MAX_BUCKET_SPAN = 20
DEEP_MODEL_LAYERS = 40


def premature_layers(dola_layers: str | list[int], num_layers: int, tied_embeddings: bool) -> list[int]:
    """The candidate premature layers of a request, with the buckets transformers defines for "low" and "high".

    "low" takes every other layer of the lower half and "high" of the upper half (of the bottom or top 20 layers
    beyond 40). A tied LM head turns the embedding output's early exit into a near-identity map, so "low" then starts
    at layer 2 (layer 1 in a 2-layer model).
    """
    if isinstance(dola_layers, list):
        out_of_range = [i for i in dola_layers if i >= num_layers]
        if out_of_range:
            raise InvalidArgumentError(
                f"dola_layers must be below the model's {num_layers} layers, got {out_of_range}", "dola_layers"
            )
        return sorted(set(dola_layers))
    half = num_layers // 2
    if dola_layers == "high":
        first = half if num_layers <= DEEP_MODEL_LAYERS else num_layers - MAX_BUCKET_SPAN
        return list(range(first, num_layers, 2))
    start = _low_start(num_layers, tied_embeddings)
    if start == half:
        return [start]
    return list(range(start, half if num_layers <= DEEP_MODEL_LAYERS else MAX_BUCKET_SPAN, 2))


def _low_start(num_layers: int, tied_embeddings: bool) -> int:
    if not tied_embeddings:
        return 0
    return 2 if num_layers > 2 else 1 if num_layers == 2 else 0


def dola_logits(final_logits: torch.Tensor, premature_logits: torch.Tensor) -> torch.Tensor:
    """One row's contrasted logits [vocab] from the final logits [vocab] and the candidates' [layers, vocab]."""
    final = torch.log_softmax(final_logits.float(), dim=-1)
    candidates = torch.log_softmax(premature_logits.float(), dim=-1)
    chosen = candidates[jensen_shannon(final, candidates).argmax()] if len(candidates) > 1 else candidates[0]
    plausible = final >= final.max() + math.log(PLAUSIBILITY_ALPHA)
    return torch.where(plausible, final - chosen, float("-inf"))


def jensen_shannon(log_p: torch.Tensor, log_qs: torch.Tensor) -> torch.Tensor:
    """JSD(p, q) [layers] between one distribution and each of several, all given as log-probabilities."""
    # In log space, so that tokens both sides deem impossible add 0 instead of 0 * inf.
    log_mean = torch.logaddexp(log_p, log_qs) - math.log(2)
    kl_p = (log_p.exp() * (log_p - log_mean)).sum(-1)
    kl_q = (log_qs.exp() * (log_qs - log_mean)).sum(-1)
    return 0.5 * (kl_p + kl_q)
