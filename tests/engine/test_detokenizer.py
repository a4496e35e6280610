"""Text at the edge: incremental detokenization, stop strings, TokenDelta -> RequestOutput.

Everything runs on real ``tokenizers`` objects: a byte-level BPE trained here on a small
corpus with CJK and emoji (so characters split across tokens), and hand-built vocabularies
for byte-exact cases (single-byte tokens, tokens that end inside a character).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rillet.engine.detokenizer import (
    MAX_WINDOW_TOKENS,
    IncrementalDetokenizer,
    RequestTextState,
    StopStringMatcher,
)
from rillet.errors import ValidationError
from rillet.protocol import FinishReason, RequestOutput, TokenDelta, TopLogprob
from rillet.sampling import SamplingParams

FFFD = "\ufffd"
SPECIALS = ["<|endoftext|>", "<|im_end|>"]

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.\n",
    "  Indented line\n\nand a blank line before it; tabs\there.",
    "中文字符测试：你好，世界！我们正在测试增量解码。\n日本語のテキストも少し。",
    "emoji 😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 done. café naïve résumé",
    "Mixed: the 猫 sat on the 🧶 mat 🐈‍⬛ and purred.",
]
STRINGS = [
    "",
    "a",
    "Hello world",
    " leading space",
    "   three spaces and trailing ",
    "line one\nline two\n\n\tindented\r\nwindows",
    "中文字符测试",
    "你好，世界！",
    "😀",
    "👍🏽👍🏿 skin tones",
    "family 👨‍👩‍👧‍👦 and flag 🏳️‍🌈",
    "mixed 猫 and 🐈‍⬛ with café",
    "never seen: 한국어 Ωμέγα 🦀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "ends mid-emoji-sequence 👩‍",
    "<|not special|> angle brackets <b>",
]
FRAGMENTS = [
    "the",
    " fox",
    " 猫",
    "世界",
    "😀",
    "👍🏽",
    "👨‍👩‍👧",
    "\n",
    "  ",
    "é",
    "!",
    "🦀",
    "字符",
]


class Adapter:
    """What rillet.tokenizer.Tokenizer offers, around a raw ``tokenizers.Tokenizer``."""

    def __init__(self, backend: Tokenizer) -> None:
        self.backend = backend
        added = backend.get_added_tokens_decoder()
        self._special = {i for i, token in added.items() if token.special}
        self.max_decode_len = 0

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.max_decode_len = max(self.max_decode_len, len(ids))
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False).ids)


def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable char table, which the ByteLevel decoder inverts."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def byte_level(vocab_tokens: Sequence[bytes] = ()) -> Adapter:
    """All 256 single-byte tokens (id == byte value), extra multi-byte ones, two specials."""
    chars = byte_chars()
    vocab = {chars[b]: b for b in range(256)}
    for token in vocab_tokens:
        vocab["".join(chars[b] for b in token)] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    return Adapter(backend)


@pytest.fixture(scope="module")
def trained() -> Adapter:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 10, trainer)
    return Adapter(backend)


@pytest.fixture(scope="module")
def bytes_tok() -> Adapter:
    # "\xb8\xad\xe4" ends inside a character (中 = e4 b8 ad): a chain of such tokens never
    # reaches a clean token boundary.
    return byte_level([b"\xb8\xad\xe4", "中".encode(), b" the"])


def token_id(tok: Adapter, token: bytes) -> int:
    chars = byte_chars()
    found = tok.backend.token_to_id("".join(chars[b] for b in token))
    assert found is not None
    return found


def special_id(tok: Adapter, name: str = "<|endoftext|>") -> int:
    found = tok.backend.token_to_id(name)
    assert found is not None
    return found


def replay(
    tok: Adapter, ids: Sequence[int], prompt: Sequence[int] = (), skip: bool = True
) -> tuple[list[str], str]:
    """Push ``ids`` one by one: (pieces, what flush() still had)."""
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    pieces = [detok.push(i) for i in ids]
    return pieces, detok.flush()


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 30)))


# --- IncrementalDetokenizer -------------------------------------------------------------


def test_trained_tokenizer_splits_characters(trained: Adapter) -> None:
    # The premise of the other tests: some tokens hold only part of a character.
    pieces = [trained.decode([i]) for i in trained.encode("".join(STRINGS))]
    assert any(FFFD in p for p in pieces)


@pytest.mark.parametrize("text", STRINGS)
def test_pieces_concatenate_to_full_decode(trained: Adapter, text: str) -> None:
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    for prompt in ([], trained.encode("User: hi 😀\nAssistant:")):
        pieces, rest = replay(trained, ids, prompt)
        assert ("".join(pieces), rest) == (text, "")
        assert not any(FFFD in p for p in pieces)


def test_random_valid_texts(trained: Adapter) -> None:
    rng = random.Random(1234)
    for _ in range(300):
        text = random_text(rng)
        ids = trained.encode(text)
        pieces, rest = replay(trained, ids, trained.encode(random_text(rng)))
        assert ("".join(pieces), rest) == (text, "")
        assert not any(FFFD in p for p in pieces)


def test_split_character_pieces_are_empty_until_complete(bytes_tok: Adapter) -> None:
    text = "a中😀 👨‍👩‍👧 é"
    ids = list(text.encode())  # one token per byte
    pieces, rest = replay(bytes_tok, ids)
    expected = []
    for char in text:
        size = len(char.encode())
        expected += [""] * (size - 1) + [char]
    assert (pieces, rest) == (expected, "")


def test_chain_of_tokens_ending_mid_character(bytes_tok: Adapter) -> None:
    link = token_id(bytes_tok, b"\xb8\xad\xe4")
    ids = [0xE4, *[link] * 500, 0xB8, 0xAD]
    pieces, rest = replay(bytes_tok, ids)
    assert pieces == ["", *["中"] * 500, "", "中"]
    assert rest == ""
    assert bytes_tok.max_decode_len <= 2 * MAX_WINDOW_TOKENS


def test_window_stays_bounded(trained: Adapter) -> None:
    rng = random.Random(7)
    text = "".join(random_text(rng) for _ in range(40))
    ids = trained.encode(text)
    assert len(ids) > 20 * MAX_WINDOW_TOKENS
    trained.max_decode_len = 0
    pieces, rest = replay(trained, ids)
    assert "".join(pieces) + rest == text
    assert trained.max_decode_len <= MAX_WINDOW_TOKENS


@given(data=st.data(), skip=st.booleans())
@settings(max_examples=300)
def test_any_ids_match_full_decode(bytes_tok: Adapter, data: st.DataObject, skip: bool) -> None:
    # Arbitrary ids, invalid UTF-8, characters split across tokens and specials included:
    # the pieces always join to exactly the full decode.
    ids = st.integers(0, bytes_tok.backend.get_vocab_size() - 1)
    token_ids = data.draw(st.lists(ids, max_size=40))
    prompt = data.draw(st.lists(ids, max_size=2))
    pieces, rest = replay(bytes_tok, token_ids, prompt, skip)
    assert "".join(pieces) + rest == bytes_tok.decode(token_ids, skip)


def test_invalid_bytes_are_released_after_bounded_lookahead(bytes_tok: Adapter) -> None:
    detok = IncrementalDetokenizer(bytes_tok, [])
    pieces = [detok.push(0xFF) for _ in range(4)]
    # All but the last replacement char: that one could still be an unfinished character.
    assert "".join(pieces) == FFFD * 3
    assert detok.push(ord("a")) == FFFD + "a"
    assert detok.push(0xE4) == ""
    assert detok.push(ord("b")) == FFFD + "b"  # a lead byte followed by ASCII is final


def test_flush_emits_unfinished_character(bytes_tok: Adapter) -> None:
    ids = list("ok 😀".encode())[:-2]
    pieces, rest = replay(bytes_tok, ids)
    assert "".join(pieces) == "ok "
    assert rest == FFFD == bytes_tok.decode(ids)[-1]


def test_special_tokens(bytes_tok: Adapter) -> None:
    eos = special_id(bytes_tok)
    ids = [*b"hi", eos, *"中".encode()[:1], eos, *"中".encode()[1:]]
    assert replay(bytes_tok, ids, skip=True) == (["h", "i", "", "", "", "", "中"], "")
    assert replay(bytes_tok, [*b"hi", eos], skip=False) == (["h", "i", "<|endoftext|>"], "")


def test_prompt_gives_context_for_leading_space() -> None:
    # SentencePiece-style decoders drop the first token's leading space; in context it stays.
    vocab = {"▁Hello": 0, "▁world": 1, "!": 2}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok = Adapter(backend)
    assert tok.decode([1]) == "world"
    assert replay(tok, [1, 2], prompt=[0]) == ([" world", "!"], "")
    assert replay(tok, [1, 2]) == (["world", "!"], "")


# --- StopStringMatcher -----------------------------------------------------------------


def feed_all(stop: list[str], include: bool, pieces: Sequence[str]) -> tuple[list[str], str | None]:
    matcher = StopStringMatcher(stop, include)
    out, matched = [], None
    for piece in pieces:
        visible, hit = matcher.feed(piece)
        out.append(visible)
        matched = matched or hit
    out.append(matcher.finish())
    return out, matched


def expected_visible(text: str, stop: list[str], include: bool) -> tuple[str, str | None]:
    """Reference: the first stop string to complete (longest on a tie) ends the text."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stop if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return (text[:end] if include else text[: end - len(s)]), s
    return text, None


def test_stop_across_tokens_both_modes() -> None:
    pieces = ["Hel", "lo ST", "O", "P and", " more"]
    out, hit = feed_all(["STOP"], True, pieces)
    assert (out, hit) == (["Hel", "lo ", "", "STOP", "", ""], "STOP")
    out, hit = feed_all(["STOP"], False, pieces)
    assert ("".join(out), hit) == ("Hello ", "STOP")


def test_hold_back_released_when_not_a_stop() -> None:
    matcher = StopStringMatcher(["ab"], include_stop_str_in_output=False)
    assert matcher.feed("xa") == ("x", None)
    assert matcher.feed("c") == ("ac", None)
    assert matcher.feed("zz") == ("zz", None)  # nothing held when no prefix can match


def test_hold_back_is_only_a_real_prefix() -> None:
    matcher = StopStringMatcher(["abcdef"], include_stop_str_in_output=False)
    assert matcher.feed("xyzab") == ("xyz", None)  # not max(len)-1 = 5 chars
    assert matcher.feed("cdx") == ("abcdx", None)


def test_overlapping_candidates() -> None:
    for include, visible in ((True, "abcd"), (False, "a")):
        assert feed_all(["abce", "bcd"], include, ["abc", "d!"]) == (["", visible, ""], "bcd")
    assert feed_all(["abc", "bcd"], False, ["xab", "cd"]) == (["x", "", ""], "abc")


def test_stop_at_the_very_beginning() -> None:
    assert feed_all(["##"], False, ["#", "#", "rest"]) == (["", "", "", ""], "##")
    assert feed_all(["##"], True, ["##rest"]) == (["##", ""], "##")


def test_earliest_completed_stop_wins() -> None:
    assert feed_all(["world", "lo"], False, ["hello world"])[1] == "lo"
    assert feed_all(["abc", "bc"], False, ["xabc"]) == (["x", ""], "abc")  # tie: longer


def test_stop_inside_one_token_drops_the_rest() -> None:
    matcher = StopStringMatcher(["<END>"], include_stop_str_in_output=True)
    assert matcher.feed("foo<END>bar") == ("foo<END>", "<END>")
    assert matcher.num_chars_after_stop == 3
    assert matcher.feed("baz") == ("", None)
    assert matcher.finish() == ""


def test_finish_releases_hold_back() -> None:
    matcher = StopStringMatcher(["ab"], include_stop_str_in_output=False)
    assert matcher.feed("xa") == ("x", None)
    assert matcher.finish() == "a"


def test_empty_stop_string_is_a_validation_error() -> None:
    with pytest.raises(ValidationError):
        StopStringMatcher(["ok", ""], include_stop_str_in_output=False)


STOP_ALPHABET = "abc中😀"


@given(
    text=st.text(STOP_ALPHABET, max_size=20),
    stop=st.lists(st.text(STOP_ALPHABET, min_size=1, max_size=4), max_size=3),
    include=st.booleans(),
    data=st.data(),
)
@settings(max_examples=500)
def test_any_chunking_matches_the_reference(
    text: str, stop: list[str], include: bool, data: st.DataObject
) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    matcher = StopStringMatcher(stop, include)
    seen, released, hit = "", "", None
    for piece in pieces:
        seen += piece
        visible, now = matcher.feed(piece)
        released += visible
        hit = hit or now
        if hit is None:  # held back exactly what could still start a stop string
            safe = next(i for i in range(len(seen) + 1) if _could_start(seen[i:], stop))
            assert released == seen[:safe]
    released += matcher.finish()
    assert (released, hit) == expected_visible(text, stop, include)


def _could_start(suffix: str, stop: list[str]) -> bool:
    return suffix == "" or any(s.startswith(suffix) and s != suffix for s in stop)


# --- RequestTextState ------------------------------------------------------------------

STOPS = [["世界"], ["😀!"], [" fox", "\n\n"], ["the fox", "e f"], ["👍🏽"], []]


def make_state(tok: Adapter, **params: Any) -> RequestTextState:
    prompt = tok.encode("Q: hi\nA:")
    return RequestTextState(tok, prompt, SamplingParams(**params).validate())


def run(
    state: RequestTextState, ids: list[int], sizes: Sequence[int], finish: FinishReason
) -> list[RequestOutput]:
    """Feed ``ids`` in deltas of the given sizes; the last delta carries ``finish``."""
    outputs: list[RequestOutput] = []
    start = 0
    for n, size in enumerate(sizes):
        last = n == len(sizes) - 1
        chunk = ids[start:] if last else ids[start : start + size]
        start += size
        out = state.process(TokenDelta("req-1", chunk, finish_reason=finish if last else None))
        if out is not None:
            outputs.append(out)
    return outputs


def random_sizes(rng: random.Random, total: int) -> list[int]:
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(rng.randint(0, 4))
    return [*sizes, 0]


def test_stream_equals_non_stream(trained: Adapter) -> None:
    rng = random.Random(2024)
    for _ in range(200):
        stop, include = rng.choice(STOPS), rng.random() < 0.5
        ids = trained.encode(random_text(rng))
        want_text, want_stop = expected_visible(trained.decode(ids), stop, include)
        params: dict[str, Any] = {"stop": stop, "include_stop_str_in_output": include}
        whole = make_state(trained, **params)
        (single,) = run(whole, ids, [len(ids)], FinishReason.LENGTH)
        streamed = make_state(trained, **params)
        outputs = run(streamed, ids, random_sizes(rng, len(ids)), FinishReason.LENGTH)
        for state, outs in ((whole, [single]), (streamed, outputs)):
            assert "".join(o.text for o in outs) == state.output_text == want_text
            assert [o.finish_reason for o in outs if o.finished] == [outs[-1].finish_reason]
            if want_stop is None:
                assert outs[-1].finish_reason is FinishReason.LENGTH
                assert state.num_generated_tokens == len(ids)
            else:
                assert outs[-1].finish_reason is FinishReason.STOP_SEQUENCE
                assert outs[-1].stop_sequence == want_stop
            tokens = [t for o in outs for t in o.tokens]
            assert len(tokens) == state.num_generated_tokens == outs[-1].num_generated_tokens
            if include:  # token texts end right at the stop string too
                assert "".join(t.text for t in tokens) == want_text
        assert whole.num_generated_tokens == streamed.num_generated_tokens


def test_tokens_after_stop_are_dropped(trained: Adapter) -> None:
    ids = trained.encode("Hello STOP world and more")
    completes = next(k for k in range(len(ids) + 1) if "STOP" in trained.decode(ids[:k]))
    state = make_state(trained, stop=["STOP"])
    out = state.process(TokenDelta("req-1", ids))
    assert out is not None
    assert (out.text, out.finish_reason, out.stop_sequence) == (
        "Hello ",
        FinishReason.STOP_SEQUENCE,
        "STOP",
    )
    assert len(out.tokens) == out.num_generated_tokens == completes < len(ids)
    assert "world" not in "".join(t.text for t in out.tokens)
    assert state.stop_hit  # the core must be told to stop
    assert state.process(TokenDelta("req-1", ids[:2])) is None


def test_stop_in_the_final_delta_needs_no_abort(bytes_tok: Adapter) -> None:
    state = make_state(bytes_tok, stop=["!"], include_stop_str_in_output=True)
    out = state.process(TokenDelta("req-1", list(b"hi!"), finish_reason=FinishReason.LENGTH))
    assert out is not None
    assert (out.text, out.finish_reason, state.stop_hit) == (
        "hi!",
        FinishReason.STOP_SEQUENCE,
        False,
    )


def test_eos_token_is_special_and_silent(trained: Adapter) -> None:
    eos = special_id(trained)
    state = make_state(trained)
    (first, last) = run(
        state, [*trained.encode("Hi there 😀"), eos], [3, 0], FinishReason.EOS_TOKEN
    )
    assert first.text + last.text == "Hi there 😀"
    assert (last.tokens[-1].id, last.tokens[-1].text, last.tokens[-1].special) == (eos, "", True)
    assert not any(t.special for t in first.tokens)
    assert (last.finish_reason, state.stop_hit) == (FinishReason.EOS_TOKEN, False)


def test_finish_flushes_detokenizer_and_hold_back(bytes_tok: Adapter) -> None:
    ids = list("ok 😀".encode())[:-2]
    state = make_state(bytes_tok, stop=["ok 😀?"])
    outputs = run(state, ids, [2, 2, 1], FinishReason.LENGTH)
    assert [o.text for o in outputs] == ["", "", "ok " + FFFD]
    assert outputs[-1].tokens[-1].text == FFFD  # the held bytes land on the last token
    assert state.output_text == bytes_tok.decode(ids)


def test_logprobs_and_alternatives(bytes_tok: Adapter) -> None:
    eos = special_id(bytes_tok)
    prompt = list(b"Q:")
    state = RequestTextState(bytes_tok, prompt, SamplingParams())
    delta = TokenDelta(
        "r",
        [ord("a"), 0xE4],
        logprobs=[-0.5, -1.0],
        top_logprobs=[
            [TopLogprob(ord("a"), -0.5), TopLogprob(eos, -2.0)],
            [TopLogprob(0xE4, -1.0)],
        ],
        prompt_logprobs=[None, -3.0],
        num_cached_tokens=1,
    )
    out = state.process(delta)
    assert out is not None
    assert [(t.id, t.text, t.logprob, t.special) for t in out.tokens] == [
        (ord("a"), "a", -0.5, False),
        (0xE4, "", -1.0, False),
    ]
    top = out.tokens[0].top
    assert [(t.id, t.text, t.logprob, t.special) for t in top] == [
        (ord("a"), "a", -0.5, False),
        (eos, "<|endoftext|>", -2.0, True),
    ]
    assert out.tokens[1].top[0].text == FFFD  # raw text of a partial character
    assert out.prompt_tokens is not None
    assert [(p.id, p.text, p.logprob) for p in out.prompt_tokens] == [
        (ord("Q"), "Q", None),
        (ord(":"), ":", -3.0),
    ]
    assert (out.request_id, out.num_prompt_tokens, out.num_cached_tokens) == ("r", 2, 1)


def test_min_tokens_defers_stop_strings(bytes_tok: Adapter) -> None:
    state = make_state(bytes_tok, stop=["ab"], min_tokens=2, max_new_tokens=8)
    out = state.process(TokenDelta("req-1", list(b"ababab")))
    assert out is not None
    assert (out.text, out.num_generated_tokens, out.finish_reason) == (
        "ab",
        4,
        FinishReason.STOP_SEQUENCE,
    )
