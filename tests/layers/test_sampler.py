"""Sampler: masks, penalties, greedy, per-request generators, the sampled distribution and logprobs.

Expected values are computed independently here in plain Python (float64) from the definitions.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pagedllm.layers.sampler import (
    Sampler,
    SamplingBatch,
    apply_penalties,
    apply_token_bitmask,
    apply_top_k_top_p_min_p,
    first_max_index,
)

NEG_INF = float("-inf")


def make_batch(rows: int, **columns) -> SamplingBatch:
    """A batch of `rows` with neutral settings; `columns` override (lists become tensors)."""
    defaults = dict(
        temperature=[1.0] * rows,
        top_k=[0] * rows,
        top_p=[1.0] * rows,
        min_p=[0.0] * rows,
        repetition_penalty=[1.0] * rows,
        presence_penalty=[0.0] * rows,
        frequency_penalty=[0.0] * rows,
    )
    extra = {k: v for k, v in columns.items() if k not in defaults}
    defaults.update({k: v for k, v in columns.items() if k in defaults})
    tensors = {k: torch.tensor(v, dtype=torch.int64 if k == "top_k" else torch.float32) for k, v in defaults.items()}
    extra.setdefault("generators", [None] * rows)
    return SamplingBatch(**tensors, **extra)


def softmax(values: list[float]) -> list[float]:
    finite = [v for v in values if v != NEG_INF]
    top = max(finite)
    exps = [math.exp(v - top) if v != NEG_INF else 0.0 for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def expected_kept(logits: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """Kept tokens by the textbook definitions: top-k, then the top-p nucleus of the renormalized rest, then min-p."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    kept = order[:top_k] if 0 < top_k < len(logits) else order
    if top_p < 1:
        probs = softmax([logits[i] for i in kept])
        nucleus, mass = [], 0.0
        for i, p in zip(kept, probs):
            if mass >= top_p:
                break
            nucleus.append(i)
            mass += p
        kept = nucleus
    if min_p > 0:
        top = max(logits[i] for i in kept)
        kept = [i for i in kept if math.exp(logits[i] - top) >= min_p]
    return set(kept)


def near_a_boundary(logits: list[float], top_k: int, top_p: float, min_p: float) -> bool:
    """True when float32 rounding could flip a top-p or min-p decision (a cumulative mass or a ratio ≈ the cut)."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    kept = order[:top_k] if 0 < top_k < len(logits) else order
    probs = softmax([logits[i] for i in kept])
    masses = [sum(probs[:j]) for j in range(len(probs))]
    # (top_p == 1 rows are checked too: another row may turn top-p on for the whole batch; the
    # float32 rounding of a mass to 1.0 is covered by its own test below.)
    if any(abs(m - top_p) < 1e-4 for m in masses):
        return True
    top = max(logits)
    return min_p > 0 and any(abs(math.exp(v - top) - min_p) < 1e-4 for v in logits)


def distinct_logits_of(min_size: int, max_size: int) -> st.SearchStrategy[list[float]]:
    return st.lists(st.integers(-800, 800), min_size=min_size, max_size=max_size, unique=True).map(
        lambda values: [v / 100 for v in values]
    )


distinct_logits = distinct_logits_of(2, 12)


# --- masks -------------------------------------------------------------------------------------------------------


def kept_set(row: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(row.tolist()) if v != NEG_INF}


def test_masks_on_hand_built_logits() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = torch.tensor([[math.log(p) for p in probs]] * 6)
    masked = apply_top_k_top_p_min_p(
        logits,
        top_k=torch.tensor([2, 0, 0, 0, 0, 3]),
        top_p=torch.tensor([1.0, 0.75, 0.81, 1.0, 1.0, 0.9]),
        min_p=torch.tensor([0.0, 0.0, 0.0, 0.25, 0.5, 0.0]),
    )
    assert kept_set(masked[0]) == {0, 1}  # top-2
    assert kept_set(masked[1]) == {0, 1}  # 0.5 + 0.3 ≥ 0.75
    assert kept_set(masked[2]) == {0, 1, 2}  # 0.8 < 0.81: one more
    assert kept_set(masked[3]) == {0, 1, 2}  # ≥ 0.25 × 0.5
    assert kept_set(masked[4]) == {0, 1}  # ≥ 0.5 × 0.5
    # top-3 renormalizes to 0.526, 0.316, 0.158: a 0.9 nucleus needs all three (0.842 < 0.9).
    assert kept_set(masked[5]) == {0, 1, 2}
    # Kept logits are left as they were.
    for row in range(6):
        for i in kept_set(masked[row]):
            assert masked[row, i] == logits[row, i]


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            distinct_logits,
            st.integers(0, 14),
            st.one_of(st.just(1.0), st.floats(0.05, 0.99)),
            st.one_of(st.just(0.0), st.floats(0.01, 1.0)),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_masks_match_the_definitions(rows: list[tuple[list[float], int, float, float]]) -> None:
    vocab = max(len(r[0]) for r in rows)
    for logits, top_k, top_p, min_p in rows:
        assume(not near_a_boundary(logits, top_k, top_p, min_p))
    # Pad every row to one vocab with -inf (tokens that are never candidates).
    padded = [r[0] + [NEG_INF] * (vocab - len(r[0])) for r in rows]
    masked = apply_top_k_top_p_min_p(
        torch.tensor(padded, dtype=torch.float32),
        torch.tensor([r[1] for r in rows]),
        torch.tensor([r[2] for r in rows], dtype=torch.float32),
        torch.tensor([r[3] for r in rows], dtype=torch.float32),
    )
    for row, (logits, top_k, top_p, min_p) in enumerate(rows):
        expected = expected_kept(logits, min(top_k, len(logits)) if top_k else 0, top_p, min_p)
        assert kept_set(masked[row]) == expected
        for i in expected:
            assert masked[row, i].item() == pytest.approx(logits[i], abs=1e-6)


def test_top_p_of_one_keeps_every_token_whatever_the_other_rows() -> None:
    # Row 1 asks for no nucleus (top_p = 1). Its last token has probability ~1.6e-7: the float32 mass before it
    # rounds to 1.0, and must not be cut because row 0 turned top-p on for the batch.
    logits = torch.tensor([[0.0, 1.0, NEG_INF], [7.0, 8.0, -7.625]])
    alone = apply_top_k_top_p_min_p(logits[1:], torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert kept_set(alone[0]) == {0, 1, 2}
    together = apply_top_k_top_p_min_p(logits, torch.tensor([0, 0]), torch.tensor([0.5, 1.0]), torch.tensor([0.0, 0.0]))
    assert kept_set(together[0]) == {1}
    assert kept_set(together[1]) == {0, 1, 2}


# --- penalties -----------------------------------------------------------------------------------------------------


def reference_penalties(
    logits: list[float], seen: set[int], output: list[int], repetition: float, presence: float, frequency: float
) -> list[float]:
    result = []
    for token, value in enumerate(logits):
        if token in seen:
            value = value / repetition if value > 0 else value * repetition
        count = output.count(token)
        value -= frequency * count + (presence if count else 0.0)
        result.append(value)
    return result


def penalty_batch(rows: list[tuple[list[int], list[int], float, float, float]], vocab: int) -> SamplingBatch:
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool)
    counts = torch.zeros(len(rows), vocab)
    for r, (prompt, output, *_) in enumerate(rows):
        for t in prompt + output:
            seen[r, t] = True
        for t in output:
            counts[r, t] += 1
    return make_batch(
        len(rows),
        repetition_penalty=[r[2] for r in rows],
        presence_penalty=[r[3] for r in rows],
        frequency_penalty=[r[4] for r in rows],
        seen_mask=seen,
        output_counts=counts,
    )


def test_penalties_on_hand_built_logits() -> None:
    logits = [2.0, -1.0, 0.5, 3.0, -2.0]
    # prompt {0, 1}; output [2, 2, 1]; repetition 2 on all seen, presence 0.5 and frequency 0.25 on the output
    batch = penalty_batch([([0, 1], [2, 2, 1], 2.0, 0.5, 0.25)], vocab=5)
    out = apply_penalties(torch.tensor([logits]), batch)[0].tolist()
    expected = [
        2.0 / 2,  # prompt only: repetition
        -1.0 * 2 - 0.25 * 1 - 0.5,  # prompt and output once
        0.5 / 2 - 0.25 * 2 - 0.5,  # output twice
        3.0,  # unseen
        -2.0,
    ]
    assert out == pytest.approx(expected)


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    vocab=st.integers(2, 10),
    num_rows=st.integers(1, 4),
)
def test_penalties_match_the_definitions(data: st.DataObject, vocab: int, num_rows: int) -> None:
    token = st.integers(0, vocab - 1)
    rows, logits = [], []
    for _ in range(num_rows):
        logits.append(data.draw(st.lists(st.floats(-5, 5), min_size=vocab, max_size=vocab)))
        rows.append(
            (
                data.draw(st.lists(token, max_size=6)),
                data.draw(st.lists(token, max_size=6)),
                data.draw(st.floats(0.5, 2.0)),
                data.draw(st.floats(-2, 2)),
                data.draw(st.floats(-2, 2)),
            )
        )
    out = apply_penalties(torch.tensor(logits), penalty_batch(rows, vocab))
    for r, (prompt, output, rep, pres, freq) in enumerate(rows):
        expected = reference_penalties(logits[r], set(prompt + output), output, rep, pres, freq)
        assert out[r].tolist() == pytest.approx(expected, abs=1e-5)


# --- greedy, bans ---------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(distinct_logits_of(6, 6), min_size=1, max_size=6))
def test_greedy_is_argmax_whatever_the_filters(rows: list[list[float]]) -> None:
    n = len(rows)
    batch = make_batch(n, temperature=[0.0] * n, top_k=[1 + r % 3 for r in range(n)], top_p=[0.3] * n, min_p=[0.9] * n)
    out = Sampler(torch.Generator().manual_seed(0))(torch.tensor(rows), batch)
    assert out.token_ids == [max(range(6), key=lambda i: row[i]) for row in rows]
    assert out.token_logprobs is None and out.top_ids is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_first_max_index_takes_the_first_of_equal_maxima_and_of_nans(dtype: torch.dtype) -> None:
    logits = torch.tensor(
        [
            [1.0, 3.0, 2.0, 3.0],  # a tie: the first
            [NEG_INF, NEG_INF, NEG_INF, NEG_INF],  # all banned: the first
            [0.0, float("nan"), 5.0, float("nan")],  # NaN wins, as PyTorch's max has it
            [-2.0, -1.0, -1.5, -3.0],
        ]
    ).to(dtype)
    got = first_max_index(logits)
    assert got.dtype == torch.int64 and got.tolist() == [1, 0, 1, 1]
    vocabulary = torch.randn(6, 49152, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert torch.equal(first_max_index(vocabulary), vocabulary.max(dim=-1).indices)


def test_greedy_rows_stay_argmax_beside_random_rows_and_bans_hold() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 20)
    banned = torch.zeros(8, 20, dtype=torch.bool)
    top = logits.argmax(dim=-1)
    banned[1, top[1]] = True  # greedy row with its best token banned
    banned[3, top[3]] = True  # random row with its best token banned
    temperature = [0.0, 0.0, 1.0, 0.5, 0.0, 2.0, 0.0, 1.0]
    sampler = Sampler(torch.Generator().manual_seed(1))
    for _ in range(20):
        out = sampler(logits, make_batch(8, temperature=temperature, banned_mask=banned))
        for row in (0, 4, 6):
            assert out.token_ids[row] == top[row].item()
        assert out.token_ids[1] == logits[1].masked_fill(banned[1], NEG_INF).argmax().item()
        assert out.token_ids[3] != top[3].item()


def test_penalties_apply_before_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    sampler = Sampler(torch.Generator().manual_seed(0))
    batch = make_batch(1, temperature=[0.0], presence_penalty=[0.5], output_counts=torch.tensor([[1.0, 0.0, 0.0]]))
    assert sampler(logits, batch).token_ids == [1]


# --- draws ---------------------------------------------------------------------------------------------------------


def test_seeded_rows_draw_the_same_whatever_else_is_in_the_batch() -> None:
    torch.manual_seed(0)
    vocab = 50
    row_logits = torch.randn(vocab) * 0.5  # flat enough that draws vary

    def draws(batch_size: int, position: int, seed_others: bool) -> list[int]:
        generator = torch.Generator().manual_seed(1234)
        others = [torch.Generator().manual_seed(99 + r) if seed_others else None for r in range(batch_size)]
        sampler = Sampler(torch.Generator().manual_seed(batch_size))
        tokens = []
        for _ in range(25):
            logits = torch.randn(batch_size, vocab)
            logits[position] = row_logits
            generators = list(others)
            generators[position] = generator
            temperature = [1.0 if r % 2 else 0.7 for r in range(batch_size)]
            temperature[position] = 1.0
            batch = make_batch(
                batch_size, temperature=temperature, top_k=[r % 4 for r in range(batch_size)], generators=generators
            )
            batch.top_k[position] = 0
            tokens.append(sampler(logits, batch).token_ids[position])
        return tokens

    alone = draws(1, 0, False)
    assert len(set(alone)) > 5  # the draws really are random
    assert draws(5, 2, False) == alone
    assert draws(7, 6, True) == alone
    assert draws(3, 0, True) == alone

    other_seed = Sampler(torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(4321)
    different = [
        other_seed(row_logits.unsqueeze(0), make_batch(1, generators=[generator])).token_ids[0] for _ in range(25)
    ]
    assert different != alone


def chi_square_sf(x: float, df: int) -> float:
    """Survival function of the chi-square distribution (closed forms for integer df)."""
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for j in range(1, df // 2):
            term *= (x / 2) / j
            total += term
        return math.exp(-x / 2) * total
    term = math.sqrt(2 * x / math.pi) * math.exp(-x / 2) if x > 0 else 0.0
    total, series = 0.0, term
    for j in range(1, (df - 1) // 2 + 1):
        total += series
        series *= x / (2 * j + 1)
    return math.erfc(math.sqrt(x / 2)) + total


def test_chi_square_sf_matches_known_quantiles() -> None:
    # Textbook 5% critical values.
    assert chi_square_sf(11.0705, 5) == pytest.approx(0.05, abs=1e-4)
    assert chi_square_sf(7.8147, 3) == pytest.approx(0.05, abs=1e-4)
    assert chi_square_sf(9.4877, 4) == pytest.approx(0.05, abs=1e-4)


def assert_frequencies(tokens: list[int], expected_probs: list[float]) -> None:
    counts = [tokens.count(i) for i in range(len(expected_probs))]
    n = len(tokens)
    support = [i for i, p in enumerate(expected_probs) if p > 0]
    for i, p in enumerate(expected_probs):
        if p == 0:
            assert counts[i] == 0, f"token {i} has probability 0 but was drawn {counts[i]} times"
    stat = sum((counts[i] - n * expected_probs[i]) ** 2 / (n * expected_probs[i]) for i in support)
    p_value = chi_square_sf(stat, len(support) - 1)
    assert p_value > 1e-6, f"counts {counts} vs expected {[round(n * p) for p in expected_probs]}: p={p_value:.2e}"


LOGITS_6 = [1.0, 0.2, -0.5, 2.0, 0.0, -1.5]


def test_temperature_one_frequencies_match_softmax() -> None:
    n = 20_000
    sampler = Sampler(torch.Generator().manual_seed(7))
    out = sampler(torch.tensor([LOGITS_6] * n), make_batch(n))
    assert_frequencies(out.token_ids, softmax(LOGITS_6))


def test_filtered_frequencies_match_the_renormalized_distribution() -> None:
    n = 20_000
    temperature, top_k = 0.7, 4
    sampler = Sampler(torch.Generator().manual_seed(8))
    out = sampler(torch.tensor([LOGITS_6] * n), make_batch(n, temperature=[temperature] * n, top_k=[top_k] * n))
    scaled = [v / temperature for v in LOGITS_6]
    kept = sorted(range(6), key=lambda i: -scaled[i])[:top_k]
    expected = softmax([scaled[i] if i in kept else NEG_INF for i in range(6)])
    assert_frequencies(out.token_ids, expected)


def test_seeded_generator_frequencies_match_softmax() -> None:
    n = 5_000
    generator = torch.Generator().manual_seed(11)
    sampler = Sampler(torch.Generator().manual_seed(0))
    out = sampler(torch.tensor([LOGITS_6] * n), make_batch(n, generators=[generator] * n))
    assert_frequencies(out.token_ids, softmax(LOGITS_6))


# --- logprobs ----------------------------------------------------------------------------------------------------


def log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    log_total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_total for v in values]


@pytest.mark.parametrize("num_logprobs", [0, 1, 3])
def test_logprobs_are_log_softmax_of_the_raw_logits(num_logprobs: int) -> None:
    torch.manual_seed(3)
    logits = torch.randn(4, 9) * 2
    # Penalties, temperature and filters change what is drawn but not the reported logprobs.
    batch = make_batch(
        4,
        temperature=[0.0, 0.5, 1.3, 1.0],
        top_k=[0, 2, 0, 3],
        repetition_penalty=[1.5] * 4,
        seen_mask=torch.ones(4, 9, dtype=torch.bool),
        num_logprobs=num_logprobs,
    )
    out = Sampler(torch.Generator().manual_seed(0))(logits, batch)
    for row in range(4):
        expected = log_softmax(logits[row].tolist())
        assert out.token_logprobs[row] == pytest.approx(expected[out.token_ids[row]], abs=1e-5)
        ranked = sorted(range(9), key=lambda i: -expected[i])[:num_logprobs]
        assert out.top_ids[row] == ranked
        assert out.top_logprobs[row] == pytest.approx([expected[i] for i in ranked], abs=1e-5)


def reference_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Token by token: t is allowed when bit t % 32 of word t // 32 is set."""
    out = logits.clone()
    for row in range(logits.shape[0]):
        for token in range(logits.shape[1]):
            if not (int(bitmask[row, token // 32]) >> (token % 32)) & 1:
                out[row, token] = float("-inf")
    return out


@pytest.mark.parametrize("vocab", [64, 70, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the single-pass path and the torch path
def test_token_bitmask_matches_the_reference(vocab: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), dtype=torch.int32, generator=generator)
    bitmask[2] = -1  # an unconstrained row keeps every logit
    logits = torch.randn(3, vocab, generator=generator).to(dtype)
    with torch.inference_mode():  # as the engine applies it
        masked = apply_token_bitmask(logits, bitmask)
    assert masked.dtype == dtype
    assert torch.equal(masked, reference_token_bitmask(logits, bitmask))
    assert torch.equal(masked[2], logits[2])
    assert not torch.isinf(logits).any()  # the logits themselves are left as they were


def test_sampling_under_a_bitmask_draws_only_allowed_tokens() -> None:
    vocab = 96
    bitmask = torch.zeros(4, 3, dtype=torch.int32)
    bitmask[:, 1] = 0b1010  # tokens 33 and 35 only
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    batch = make_batch(4, temperature=[0.0, 0.7, 1.0, 2.0])
    batch.allowed_bitmask = bitmask
    for seed in range(5):
        out = Sampler(torch.Generator().manual_seed(seed))(logits, batch)
        assert set(out.token_ids) <= {33, 35}


def test_logit_bias_shifts_the_greedy_choice() -> None:
    logits = torch.zeros(2, 8)
    logits[:, 3] = 1.0
    batch = make_batch(2, temperature=[0.0, 0.0])
    batch.logit_bias = torch.zeros(2, 8)
    batch.logit_bias[1, 5] = 100.0
    assert Sampler(torch.Generator())(logits, batch).token_ids == [3, 5]
