"""Contrastive search and DoLa through the paged engine, token for token against plain re-forward references of
each paper's formula on a tiny random Llama run by transformers, alone and in batches with other strategies."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.errors import InvalidArgumentError, RequestTooLongError
from pagedllm.layers.dola import premature_layers
from tests.checkpoints import write_checkpoint
from tests.model.test_gemma3 import write_tiny_gemma3

NUM_LAYERS = 6
NUM_TOKENS = 10
VOCAB_SIZE = 1024  # the tokenizer's first ids: small enough for quick reference forwards
PROMPTS = [
    [1, 5, 9, 200, 300],
    [42, 17, 17, 17, 8, 900, 1000, 12, 7],
    [7],
    [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312, 313, 314, 315, 316, 317, 318, 319],
    [1020, 2, 1020, 2, 5],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    """A 6-layer random Llama: (its folder, the transformers model)."""
    folder = tmp_path_factory.mktemp("tiny-llama-6")
    model = write_checkpoint("llama-gqa", folder, tokenizer_dir, VOCAB_SIZE, num_hidden_layers=NUM_LAYERS)
    return folder, model.float().eval()


@pytest.fixture(scope="module")
def tiny_llm(tiny) -> LLM:
    # Blocks of 4 tokens: the candidates' position lands at every offset within a block, its first included.
    return LLM(model=str(tiny[0]), dtype="float32", quantization="none", kv_cache_memory=2**22, block_size=4)


@torch.inference_mode()
def reference_contrastive(model, prompt: list[int], alpha: float, top_k: int, num_tokens: int) -> list[int]:
    """Su et al.'s contrastive search, each step and each candidate a full forward of the whole sequence."""
    tokens = list(prompt)
    for _ in range(num_tokens):
        out = model(torch.tensor([tokens]), output_hidden_states=True, logits_to_keep=1)
        context = out.hidden_states[-1][0]  # final-normed, as the LM head reads them
        probs, ids = torch.softmax(out.logits[0, -1], dim=-1).topk(top_k)
        scores = []
        for prob, token in zip(probs.tolist(), ids.tolist()):
            candidate = model(torch.tensor([tokens + [token]]), output_hidden_states=True, logits_to_keep=1)
            hidden = candidate.hidden_states[-1][0, -1]
            cosine = torch.nn.functional.cosine_similarity(context, hidden.unsqueeze(0), dim=-1, eps=0)
            scores.append((1 - alpha) * prob - alpha * cosine.max().item())
        tokens.append(ids[scores.index(max(scores))].item())
    return tokens[len(prompt) :]


@torch.inference_mode()
def reference_dola(model, prompt: list[int], layers: list[int], num_tokens: int, penalty: float = 1.0) -> list[int]:
    """Chuang et al.'s DoLa, greedy, with CTRL's repetition penalty on the contrasted scores."""
    tokens = list(prompt)
    for _ in range(num_tokens):
        out = model(torch.tensor([tokens]), output_hidden_states=True, logits_to_keep=1)
        final = torch.log_softmax(out.logits[0, -1].double(), dim=-1)
        early = [torch.log_softmax(early_exit(model, out.hidden_states[j][0, -1]), dim=-1) for j in layers]
        divergences = [jensen_shannon(final, q) for q in early]
        premature = early[divergences.index(max(divergences))]
        scores = torch.full_like(final, -math.inf)
        plausible = final.exp() >= 0.1 * final.exp().max()
        scores[plausible] = (final - premature)[plausible]
        for token in set(tokens):
            scores[token] = scores[token] / penalty if scores[token] > 0 else scores[token] * penalty
        tokens.append(int(scores.argmax()))
    return tokens[len(prompt) :]


def early_exit(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's output head (final norm, LM head, Gemma's soft cap) on an early layer's hidden state."""
    logits = model.lm_head(model.model.norm(hidden)).double()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def jensen_shannon(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """The paper's JSD, from probabilities: 0.5 KL(p || m) + 0.5 KL(q || m), m their mean."""
    p, q = log_p.exp(), log_q.exp()
    m = 0.5 * (p + q)
    return 0.5 * (p * (p / m).log()).nansum().item() + 0.5 * (q * (q / m).log()).nansum().item()


def generate(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]


@pytest.mark.parametrize("alpha, top_k", [(0.6, 4), (0.3, 3)])
def test_contrastive_search_matches_the_reference(tiny, tiny_llm: LLM, alpha: float, top_k: int) -> None:
    params = SamplingParams(penalty_alpha=alpha, top_k=top_k, max_tokens=NUM_TOKENS, ignore_eos=True)
    ours = generate(tiny_llm, PROMPTS, [params] * len(PROMPTS))
    for prompt, tokens in zip(PROMPTS, ours):
        assert tokens == reference_contrastive(tiny[1], prompt, alpha, top_k, NUM_TOKENS)


def test_contrastive_search_differs_from_greedy(tiny_llm: LLM) -> None:
    """With a large alpha the degeneration penalty changes the picks: the branches are really scored."""
    greedy = generate(tiny_llm, PROMPTS, [SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)] * 5)
    params = SamplingParams(penalty_alpha=0.9, top_k=5, max_tokens=NUM_TOKENS, ignore_eos=True)
    assert generate(tiny_llm, PROMPTS, [params] * 5) != greedy


@pytest.mark.parametrize("dola_layers, penalty", [("low", 1.0), ("high", 1.2), ([1, 3], 1.0), ([4], 1.2)])
def test_dola_matches_the_reference(tiny, tiny_llm: LLM, dola_layers, penalty: float) -> None:
    params = SamplingParams(
        temperature=0, dola_layers=dola_layers, repetition_penalty=penalty, max_tokens=NUM_TOKENS, ignore_eos=True
    )
    layers = premature_layers(dola_layers, NUM_LAYERS, tied_embeddings=False)
    for prompt, tokens in zip(PROMPTS, generate(tiny_llm, PROMPTS, [params] * len(PROMPTS))):
        assert tokens == reference_dola(tiny[1], prompt, layers, NUM_TOKENS, penalty)


def test_both_match_the_reference_on_a_tiny_gemma3_across_its_window(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Two KV-cache groups (sliding-window and global layers): each candidate branches in both, and the window of 8
    tokens slides past blocks of 4 while the branches are scored."""
    model = write_tiny_gemma3(tmp_path, tokenizer_dir, vocab_size=VOCAB_SIZE, sliding_window=8).float()
    llm = LLM(model=str(tmp_path), dtype="float32", quantization="none", kv_cache_memory=2**22, block_size=4)
    contrastive = SamplingParams(penalty_alpha=0.6, top_k=4, max_tokens=NUM_TOKENS, ignore_eos=True)
    for prompt, tokens in zip(PROMPTS, generate(llm, PROMPTS, [contrastive] * len(PROMPTS))):
        assert tokens == reference_contrastive(model, prompt, 0.6, 4, NUM_TOKENS)
    # Layer 0 is the scaled embeddings: Gemma multiplies them by sqrt(hidden_size) before the first layer.
    layers = [0, 3, 5]
    dola = SamplingParams(temperature=0, dola_layers=layers, max_tokens=NUM_TOKENS, ignore_eos=True)
    for prompt, tokens in zip(PROMPTS, generate(llm, PROMPTS, [dola] * len(PROMPTS))):
        assert tokens == reference_dola(model, prompt, layers, NUM_TOKENS)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks


def test_a_mixed_batch_gives_each_request_what_it_gets_alone(tiny_llm: LLM) -> None:
    strategies = [
        SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=NUM_TOKENS, ignore_eos=True),
        SamplingParams(penalty_alpha=0.6, top_k=4, max_tokens=NUM_TOKENS, ignore_eos=True),
        SamplingParams(temperature=0, dola_layers="high", repetition_penalty=1.2, max_tokens=NUM_TOKENS),
        SamplingParams(penalty_alpha=0.5, top_k=3, max_tokens=NUM_TOKENS - 3, ignore_eos=True, min_tokens=2),
        SamplingParams(temperature=0.7, seed=3, dola_layers="low", max_tokens=NUM_TOKENS, ignore_eos=True),
    ]
    prompts = PROMPTS + PROMPTS[:1]
    alone = [generate(tiny_llm, [prompt], [params])[0] for prompt, params in zip(prompts, strategies)]
    assert generate(tiny_llm, prompts, strategies) == alone


def test_contrastive_search_survives_preemption(tiny) -> None:
    """A cache too small for all sequences at once preempts and recomputes them; the tokens stay the same."""
    params = SamplingParams(penalty_alpha=0.6, top_k=4, max_tokens=24, ignore_eos=True)
    roomy = LLM(model=str(tiny[0]), dtype="float32", quantization="none", kv_cache_memory=2**22, block_size=4)
    expected = generate(roomy, PROMPTS, [params] * len(PROMPTS))
    block_bytes = 2 * NUM_LAYERS * 4 * 2 * 16 * 4  # K and V, 6 layers, 4 tokens, 2 heads of 16 floats
    tight = LLM(
        model=str(tiny[0]), dtype="float32", quantization="none", kv_cache_memory=28 * block_bytes, block_size=4
    )
    assert generate(tight, PROMPTS, [params] * len(PROMPTS)) == expected
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.block_manager.num_free_blocks == tight.engine.num_blocks  # scratch blocks all went back


def test_invalid_combinations_are_refused(tiny_llm: LLM) -> None:
    with pytest.raises(InvalidArgumentError, match="top_k > 1"):
        SamplingParams(penalty_alpha=0.5)
    with pytest.raises(InvalidArgumentError, match="penalty_alpha must be in"):
        SamplingParams(penalty_alpha=1.5, top_k=4)
    for extra in (dict(n=2), dict(use_beam_search=True), dict(logprobs=1), dict(dola_layers="low")):
        with pytest.raises(InvalidArgumentError, match="not supported with penalty_alpha"):
            SamplingParams(penalty_alpha=0.5, top_k=4, **extra)
    for layers in ("middle", [], [-1], [1.5], 3):
        with pytest.raises(InvalidArgumentError, match="dola_layers must be"):
            SamplingParams(dola_layers=layers)
    with pytest.raises(InvalidArgumentError, match="below the model's 6 layers"):
        tiny_llm.generate([PROMPTS[0]], SamplingParams(dola_layers=[2, 6]))
    with pytest.raises(RequestTooLongError):
        tiny_llm.generate([PROMPTS[0]], SamplingParams(penalty_alpha=0.5, top_k=100_000))
    assert generate(tiny_llm, PROMPTS[:1], [SamplingParams(temperature=0, max_tokens=2)])  # the engine still serves


@pytest.mark.parametrize(
    "policy", [{"kv_cache_policy": "streaming", "kv_window": 32}, {"kv_cache_policy": "h2o", "kv_budget": 32}]
)
def test_contrastive_search_refuses_the_evicting_policies_which_move_its_context(tiny, policy: dict) -> None:
    llm = LLM(model=str(tiny[0]), dtype="float32", quantization="none", kv_cache_memory=2**22, **policy)
    with pytest.raises(InvalidArgumentError, match=f"{policy['kv_cache_policy']} KV-cache policy"):
        llm.generate([PROMPTS[0]], SamplingParams(penalty_alpha=0.5, top_k=4))


def test_premature_layer_buckets_follow_transformers() -> None:
    assert premature_layers("low", 6, tied_embeddings=False) == [0, 2]
    assert premature_layers("high", 6, tied_embeddings=False) == [3, 5]
    assert premature_layers("low", 30, tied_embeddings=True) == [2, 4, 6, 8, 10, 12, 14]  # SmolLM2-135M
    assert premature_layers("high", 30, tied_embeddings=True) == [15, 17, 19, 21, 23, 25, 27, 29]
    assert premature_layers("low", 2, tied_embeddings=True) == [1]
    assert premature_layers("low", 48, tied_embeddings=False) == list(range(0, 20, 2))
    assert premature_layers("high", 48, tied_embeddings=False) == list(range(28, 48, 2))
    assert premature_layers([5, 1, 5], 6, tied_embeddings=False) == [1, 5]


TEXT_PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
]


@pytest.mark.reference
@pytest.mark.slow
def test_both_match_the_reference_on_the_embedded_model(llm: LLM, hf_model) -> None:
    """SmolLM2 (30 layers, tied embeddings) in float32 against transformers running the same weights; the tiny
    model's tests above are the default run's version of this check."""
    prompts = [llm.tokenizer.encode(text) for text in TEXT_PROMPTS]
    contrastive = SamplingParams(penalty_alpha=0.6, top_k=3, max_tokens=6, ignore_eos=True)
    for prompt, tokens in zip(prompts, generate(llm, prompts, [contrastive] * len(prompts))):
        assert tokens == reference_contrastive(hf_model, prompt, 0.6, 3, 6)
    dola = SamplingParams(temperature=0, dola_layers="high", repetition_penalty=1.2, max_tokens=6, ignore_eos=True)
    layers = premature_layers("high", 30, tied_embeddings=True)
    for prompt, tokens in zip(prompts, generate(llm, prompts, [dola] * len(prompts))):
        assert tokens == reference_dola(hf_model, prompt, layers, 6, 1.2)


def test_cli_flags_build_the_sampling_params() -> None:
    from pagedllm.cli import _sampling_params, build_parser

    args = build_parser().parse_args(
        ["generate", "--prompt", "x", "--top-k", "4", "--penalty-alpha", "0.6", "--repetition-penalty", "1.2"]
    )
    params = _sampling_params(args)
    assert (params.penalty_alpha, params.top_k, params.repetition_penalty) == (0.6, 4, 1.2)
    args = build_parser().parse_args(["generate", "--prompt", "x", "--dola-layers", "2,4"])
    assert _sampling_params(args).dola_layers == [2, 4]
    assert _sampling_params(build_parser().parse_args(["chat", "--dola-layers", "high"])).dola_layers == "high"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prompt", "x", "--dola-layers", "middle"])
