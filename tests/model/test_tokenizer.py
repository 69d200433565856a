"""Tokenizer of the embedded model: streaming detokenization and the sandboxed chat template."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GemmaTokenizer, PreTrainedTokenizerFast

from pagedllm.errors import InvalidArgumentError, RequestTooLongError
from pagedllm.model import tokenizer as tokenizer_module
from pagedllm.model.registry import resolve_model_path
from pagedllm.model.tokenizer import IncrementalDetokenizer, Tokenizer, tokenizer_cache_folder

TRICKY_TEXTS = [
    "Hello, world!",
    "你好，世界！今天天气很好。",
    "日本語のテキストと中文混合",
    "café naïve résumé Ångström Œuvre",
    "e\u0301 (combining acute) and n\u0303",
    "family 👨\u200d👩\u200d👧\u200d👦 and 🏳\ufe0f\u200d🌈 and 👩🏽\u200d💻",
    "flags 🇯🇵🇫🇷 thumbs 👍🏿 👍",
    "mixed: 中文 emoji 😀😃😄 accents àéîõü and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈",
    "tabs\tand\nnewlines\r\n  spaces   ",
    "control \x01\x02\x7f and nbsp\u00a0thin\u2009space",
    "🤖",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_model_path(resolve_model_path(None))


def stream(tok: Tokenizer, prompt_ids: list[int], output_ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detokenizer = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens)
    return [detokenizer.push([token]) for token in output_ids]


def check_stream(tok: Tokenizer, prompt: str, text: str) -> None:
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    output_ids = tok.encode(text, add_special_tokens=False)
    deltas = stream(tok, prompt_ids, output_ids)
    for delta in deltas:
        assert "\ufffd" not in delta
    assert "".join(deltas) == tok.decode(output_ids)


@pytest.mark.parametrize("text", TRICKY_TEXTS)
@pytest.mark.parametrize("prompt", ["", "Prompt: ", "末尾是表情👨\u200d👩\u200d👧"])
def test_streaming_equals_one_shot_decode(tok: Tokenizer, prompt: str, text: str) -> None:
    check_stream(tok, prompt, text)


def test_tricky_texts_round_trip_and_split_characters_across_tokens(tok: Tokenizer) -> None:
    split_somewhere = False
    for text in TRICKY_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        # A byte-level vocabulary splits rare characters into several tokens: some token alone is not valid text.
        split_somewhere |= any("\ufffd" in tok.decode([i]) for i in ids)
    assert split_somewhere


def test_a_character_split_over_tokens_is_held_until_complete(tok: Tokenizer) -> None:
    ids = tok.encode("🤖", add_special_tokens=False)
    assert len(ids) > 1
    deltas = stream(tok, tok.encode("Hi ", add_special_tokens=False), ids)
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🤖"


def test_special_tokens_in_the_stream(tok: Tokenizer) -> None:
    eos = next(iter(tok.eos_token_ids))
    ids = tok.encode("Hi 你", add_special_tokens=False) + [eos] + tok.encode("好 there", add_special_tokens=False)
    for skip in (True, False):
        deltas = stream(tok, [], ids, skip_special_tokens=skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in d for d in deltas)
    assert tok.hf.eos_token not in tok.decode(ids, skip_special_tokens=True)
    assert tok.hf.eos_token in tok.decode(ids, skip_special_tokens=False)


# Excluded: U+FFFD itself (a trailing U+FFFD reads as "character incomplete"), and planes 4-11 (U+40000-U+BFFFF,
# all unassigned): SmolLM2's vocabulary has no byte tokens for their UTF-8 lead bytes F1/F2, so encoding drops a
# byte and even the one-shot decode is U+FFFD.
unicode_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd").filter(
        lambda c: not 0x40000 <= ord(c) < 0xC0000
    ),
    max_size=30,
)
fragments = st.lists(
    st.one_of(unicode_text, st.sampled_from(TRICKY_TEXTS), st.sampled_from(["\u200d", "\ufe0f", "🏽", "\u0301"])),
    max_size=5,
).map("".join)


@settings(max_examples=120, deadline=None)
@given(prompt=fragments, text=fragments)
def test_streaming_random_unicode(tok: Tokenizer, prompt: str, text: str) -> None:
    check_stream(tok, prompt, text)


# --- chat template -----------------------------------------------------------------------------------------------


def test_render_chat_two_turns(tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Bonjour, ça va ?"},
        {"role": "assistant", "content": "Oui 😀"},
        {"role": "user", "content": "你好"},
    ]
    prompt = tok.render_chat(messages)
    assert prompt == tok.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # ChatML: each turn framed by its role; the reply is prompted for at the end.
    positions = [prompt.index(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>") for m in messages]
    assert positions == sorted(positions)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert not tok.render_chat(messages, add_generation_prompt=False).endswith("<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert tok.render_chat(with_system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    ids = tok.encode_chat(messages)
    assert tok.decode(ids, skip_special_tokens=False) == prompt


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"content": "no role"}],
        [{"role": "user"}],
        [{"role": "function", "content": "x"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": ["list", "content"]}],
        [{"role": "user", "content": "ok"}, {"role": "USER", "content": "x"}],
        ["just a string"],
        [None],
    ],
    ids=["empty", "no-role", "no-content", "bad-role", "none-content", "list-content", "bad-second", "str", "none"],
)
def test_malformed_messages_are_invalid_arguments(tok: Tokenizer, messages: list) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        tok.render_chat(messages)
    assert info.value.param == "messages"


def with_template(tok: Tokenizer, template: str | None) -> Tokenizer:
    custom = Tokenizer(tok.hf)
    custom.chat_template = template
    return custom


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__.__mro__ }}",
        "{{ messages[0].content.__class__.__base__.__subclasses__() }}",
        "{{ messages.append({'role': 'system', 'content': 'injected'}) }}",
        "{{ messages[0].update({'content': 'changed'}) }}",
        "{{ raise_exception('template says no') }}",
        "{% for m in messages %}{{ m.content",
    ],
)
def test_unsafe_or_broken_templates_raise(tok: Tokenizer, template: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidArgumentError):
        with_template(tok, template).render_chat(messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_an_unsafe_attribute_renders_as_undefined_not_as_its_value(tok: Tokenizer) -> None:
    # The sandbox does not hand out `__globals__`; a lone undefined prints as nothing (as in HF's environment).
    prompt = with_template(tok, "[{{ raise_exception.__globals__ }}][{{ messages.__class__ }}]").render_chat(
        [{"role": "user", "content": "hi"}]
    )
    assert prompt == "[][]"


def test_custom_template_renders_in_the_sandbox(tok: Tokenizer) -> None:
    custom = with_template(tok, "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}{{ eos_token }}")
    prompt = custom.render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert prompt == f"[user]a\n[assistant]b\n{tok.hf.eos_token}"


def test_no_template_is_an_invalid_argument(tok: Tokenizer) -> None:
    with pytest.raises(InvalidArgumentError):
        with_template(tok, None).render_chat([{"role": "user", "content": "hi"}])


def test_rendering_gives_up_once_the_text_passes_max_chars(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    messages = [{"role": "user", "content": ""}] * 65000
    rendered: list[str] = []
    real_join = tokenizer_module._join_at_most

    def counting_join(pieces: Iterator[str], max_chars: int | None) -> str:
        return real_join((rendered.append(piece) or piece for piece in pieces), max_chars)

    monkeypatch.setattr(tokenizer_module, "_join_at_most", counting_join)
    with pytest.raises(RequestTooLongError, match="more than 1000 characters"):
        tok.encode_chat(messages, max_chars=1000)
    assert sum(map(len, rendered)) < 2000  # stopped near the limit, not after 65,000 messages
    short = [{"role": "user", "content": "Hi"}]
    assert tok.render_chat(short, max_chars=1000) == tok.render_chat(short)


@given(st.text(st.characters(categories=("L", "M", "N", "P", "S", "Zs")), min_size=1, max_size=200))
@settings(max_examples=50, deadline=None)
def test_no_token_stands_for_more_than_max_token_chars(tok: Tokenizer, text: str) -> None:
    assert len(tok.encode(text, add_special_tokens=False)) * tok.max_token_chars >= len(text)


def test_a_cached_gguf_tokenizer_loads_as_the_plain_backend_with_the_same_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tokenizer saved from a model-specific class (Gemma's) is read back from its tokenizer.json alone, without
    the class's Python copies of the vocabulary, and encodes and decodes as that class does."""
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path / "cache"))
    gguf_path = tmp_path / "model.gguf"
    gguf_path.write_bytes(b"GGUF")  # only its identity matters: the tokenizer is found in the cache
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "llo", "▁he", "▁hello", "▁w", "or", "▁wor"]
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *pieces, "▁word"])}
    merges = [("▁", "h"), ("h", "e"), ("l", "l"), ("ll", "o"), ("▁", "he"), ("▁he", "llo"), ("▁", "w"), ("o", "r")]
    merges += [("▁w", "or"), ("▁wor", "d")]
    original = GemmaTokenizer(vocab=vocab, merges=merges)
    original.save_pretrained(str(tokenizer_cache_folder(gguf_path)))

    loaded = Tokenizer.from_model_path(gguf_path)

    assert type(loaded.hf) is PreTrainedTokenizerFast
    assert not hasattr(loaded.hf, "_merges")
    for text in ["hello world", " hello", "held old word", "<bos>hello<eos>", ""]:
        for special in (True, False):
            assert loaded.encode(text, special) == original.encode(text, add_special_tokens=special)
    ids = original.encode("hello world hello")
    assert loaded.decode(ids) == original.decode(ids, skip_special_tokens=True)
    assert loaded.special_ids == frozenset(original.all_special_ids)
    assert loaded.eos_token_ids == frozenset({original.eos_token_id})
