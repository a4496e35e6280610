"""Constrained decoding: the constraint spec, the sampler's mask, request matchers, and the
engine end to end on a tiny random model (fp32, greedy: results are deterministic).

A random model writes nonsense, so the schemas here bound every value (enums, short
strings, ranged integers): the grammar, not the model, decides when the output is done.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import jsonschema
import pytest
import torch

from rillet import LLM, SamplingParams
from rillet.config import EngineConfig
from rillet.constraint import Constraint, ConstraintKind
from rillet.engine.async_engine import AsyncEngine
from rillet.engine.grammar import (
    SPLIT_APPLY_ROWS,
    GrammarCache,
    Grammars,
    RequestGrammar,
    TokenBitmask,
    apply_token_bitmask,
    check_constraint,
)
from rillet.engine.request import Request
from rillet.engine.sampler import Sampler, SamplingRow
from rillet.errors import GenerationError, ValidationError
from rillet.models import cpu_kernels
from rillet.models.loader import load_model_files
from rillet.protocol import FinishReason
from rillet.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "viewer"]},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "ok"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,4}"
#: A grammar whose language is empty: no character matches, so no token is ever allowed.
IMPOSSIBLE = "root ::= [^\\x00-\\U0010FFFF]"
PROMPTS = ["Hi", "Give me a JSON person:", "日本の首都は", "1, 2, 3,"]


# ---- the spec ----------------------------------------------------------------------------


def test_constraints_are_hashable_picklable_and_keep_property_order() -> None:
    a = Constraint.json_schema({"b": 1, "a": 2})
    assert a == Constraint.json_schema('{"b": 1, "a": 2}')
    assert a.value == '{"b":1,"a":2}'  # the order the model must write properties in
    assert pickle.loads(pickle.dumps(a)) == a and hash(a) == hash(Constraint.json_schema(a.value))
    assert Constraint.choice(["yes", "no"]).kind is ConstraintKind.CHOICE
    for bad in (
        lambda: Constraint.json_schema("{nope"),
        lambda: Constraint.json_schema("[1]"),
        lambda: Constraint.regex(""),
        lambda: Constraint.choice([]),
    ):
        with pytest.raises(ValidationError):
            bad()


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (Constraint.json_schema({"type": "strin"}), "Unsupported type"),
        (Constraint.json_schema({"properties": {"a": {"$ref": "#/nope"}}}), "nope"),
        (Constraint.regex("(abc"), "parenthesis"),
        (Constraint.regex("a(?=b)"), "Lookahead"),
        (Constraint.grammar('root ::= "a" | '), "EBNF"),
    ],
)
def test_bad_constraints_are_validation_errors(constraint: Constraint, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        check_constraint(constraint)
    assert not info.value.message.startswith("[")  # no library log prefix for the client


def test_ignore_eos_cannot_combine_with_a_constraint() -> None:
    with pytest.raises(ValidationError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, constraint=Constraint.json_object()).validate()


# ---- the sampler's mask ------------------------------------------------------------------


def _bitmask(allowed: list[list[int] | None], vocab: int) -> TokenBitmask:
    bits = torch.zeros((len(allowed), (vocab + 31) // 32), dtype=torch.int32)
    rows = []
    for r, ids in enumerate(allowed):
        if ids is None:
            bits[r] = -1
            continue
        rows.append(r)
        for t in ids:
            word = int(bits[r, t // 32]) & 0xFFFFFFFF | (1 << (t % 32))
            bits[r, t // 32] = word - (1 << 32) if word >= 1 << 31 else word
    return TokenBitmask(bits, rows)


def test_a_mask_of_many_rows_split_over_two_threads_masks_exactly_its_rows() -> None:
    vocab = 1000
    torch.manual_seed(1)
    logits = torch.randn(24, vocab)
    allowed: list[list[int] | None] = [
        None if r % 5 == 0 else sorted({(r * 37 + k * 11) % vocab for k in range(r + 1)})
        for r in range(24)
    ]
    mask = _bitmask(allowed, vocab)
    assert len(mask.rows) >= SPLIT_APPLY_ROWS  # the two-thread path
    masked = logits.clone()
    apply_token_bitmask(masked, mask)
    for r, ids in enumerate(allowed):
        if ids is None:
            assert torch.equal(masked[r], logits[r])
        else:
            finite = torch.isfinite(masked[r]).nonzero().flatten().tolist()
            assert finite == ids and torch.equal(masked[r, ids], logits[r, ids])


@pytest.mark.parametrize("vocab", [1000, 49152, 50021])
def test_the_native_kernel_masks_as_xgrammar_does(vocab: int) -> None:
    """rillet's CPU mask kernel (csrc/token_mask.cpp) against xgrammar's: whole words
    allowed, whole words refused, mixed words, a vocabulary that is not a multiple of 32,
    and rows left out of ``rows`` untouched."""
    native = cpu_kernels.load()
    if native is None:
        pytest.skip("the CPU kernels do not build on this machine")
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=generator)
    bits = torch.randint(-(2**31), 2**31 - 1, (9, (vocab + 31) // 32), generator=generator)
    bits = bits.to(torch.int32)
    bits[1] = -1  # every token allowed
    bits[2] = 0  # none
    bits[3, ::2] = -1
    mask = TokenBitmask(bits, rows=[0, 1, 2, 3, 5, 8])
    ours, theirs = logits.clone(), logits.clone()
    apply_token_bitmask(ours, mask, native)
    apply_token_bitmask(theirs, mask)
    assert torch.equal(ours, theirs)
    for r in (4, 6, 7):
        assert torch.equal(ours[r], logits[r])
    assert torch.isinf(ours[2]).all() and torch.equal(ours[1], logits[1])


@pytest.mark.parametrize("vocab", [1000, 49152, 50021])
def test_the_native_masked_argmax_is_the_argmax_of_the_masked_row(vocab: int) -> None:
    """``masked_argmax`` (csrc/token_mask.cpp) against ``apply_token_bitmask`` then
    ``argmax``: random masks, every token allowed, one allowed token in the tail past the
    last whole word, ties (the lowest id wins, as torch's argmax), allowed logits all -inf
    (the first allowed id), and rows picked out of order."""
    native = cpu_kernels.load()
    if native is None:
        pytest.skip("the CPU kernels do not build on this machine")
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(8, vocab, generator=generator)
    bits = torch.randint(-(2**31), 2**31 - 1, (8, (vocab + 31) // 32), generator=generator)
    bits = bits.to(torch.int32)
    bits[1] = -1  # every token allowed
    bits[2] = 0
    tail = vocab - 1  # in the last, partial word when vocab % 32 != 0
    bits[2, tail // 32] = 1 << (tail % 32) if tail % 32 < 31 else -(2**31)
    logits[3, 100:900:40] = 50.0  # ties: the lowest allowed of them wins
    bits[3, 100 // 32 : 900 // 32] = -1
    logits[4] = float("-inf")
    rows = [7, 0, 1, 2, 3, 4, 5]
    mask = TokenBitmask(bits, rows)
    masked = logits.clone()
    apply_token_bitmask(masked, mask, native)
    expected = masked[rows].argmax(dim=1).tolist()
    expected[rows.index(4)] = min(_allowed(bits, 4))  # the first allowed id
    ours = native.masked_argmax(logits, bits, torch.tensor(rows, dtype=torch.int64)).tolist()
    assert ours == expected
    assert ours[rows.index(2)] == tail
    assert ours[rows.index(3)] == 100


def test_the_greedy_masked_step_picks_what_the_general_path_picks() -> None:
    """The sampler's native greedy path (no sampled row, no penalty, no logprobs) returns the
    tokens of the mask-then-argmax path, constrained and unconstrained rows alike, and
    leaves the step's logits unwritten; a row asking for logprobs takes the general path."""
    native = cpu_kernels.load()
    if native is None:
        pytest.skip("the CPU kernels do not build on this machine")
    vocab = 2000
    torch.manual_seed(1)
    logits = torch.randn(6, vocab) * 3
    allowed: list[list[int] | None] = [None, [5, 17, 1999], None, [0], None, list(range(40, 80))]
    greedy = [SamplingRow(SamplingParams(temperature=0.0), [1], []) for _ in range(6)]
    before = logits.clone()
    fast = Sampler(seed=0, native=native)(logits, greedy, _bitmask(allowed, vocab))
    assert torch.equal(logits, before)  # read through the mask, not written
    general = Sampler(seed=0)(logits.clone(), greedy, _bitmask(allowed, vocab))
    assert fast.token_ids == general.token_ids
    for r, ids in enumerate(allowed):
        assert fast.token_ids[r] == (
            int(before[r].argmax()) if ids is None else max(ids, key=lambda t: before[r, t])
        )
    asking = [*greedy[:5], SamplingRow(SamplingParams(temperature=0.0, logprobs=True), [1], [])]
    out = Sampler(seed=0, native=native)(logits.clone(), asking, _bitmask(allowed, vocab))
    assert out.token_ids == general.token_ids and out.logprobs is not None


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_mixed_batch_unconstrained_rows_are_unchanged(temperature: float) -> None:
    vocab = 1000
    torch.manual_seed(0)
    logits = torch.randn(6, vocab) * 3
    allowed: list[list[int] | None] = [None, [5, 17, 999], None, [0], None, list(range(40, 80))]

    def rows() -> list[SamplingRow]:
        params = SamplingParams(temperature=temperature, logprobs=True, top_logprobs=3)
        return [
            SamplingRow(params, [1], [], Sampler.make_generator(100 + i, "cpu")) for i in range(6)
        ]

    masked = Sampler(seed=0)(logits.clone(), rows(), _bitmask(allowed, vocab))
    plain = Sampler(seed=0)(logits.clone(), rows())
    for r, ids in enumerate(allowed):
        if ids is None:
            assert masked.token_ids[r] == plain.token_ids[r]
            assert masked.logprobs is not None and plain.logprobs is not None
            assert masked.logprobs[r] == plain.logprobs[r]
            continue
        assert masked.token_ids[r] in ids
        # Logprobs are the constrained distribution's: renormalized over the allowed ids.
        expected = logits[r, ids].log_softmax(0)[ids.index(masked.token_ids[r])]
        assert masked.logprobs is not None
        assert masked.logprobs[r] == pytest.approx(float(expected), abs=1e-5)
        assert masked.top_logprobs is not None
        assert {t.token_id for t in masked.top_logprobs[r]} <= set(ids)
        assert len(masked.top_logprobs[r]) == min(3, len(ids))  # never an impossible token


# ---- request matchers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_model_files(None).tokenizer


def _allowed(bits: torch.Tensor, row: int = 0) -> set[int]:
    words = bits[row].tolist()
    return {w * 32 + b for w, word in enumerate(words) for b in range(32) if (word >> b) & 1}


def test_matcher_follows_committed_tokens_and_rolls_back(tokenizer: Tokenizer) -> None:
    cache = GrammarCache(tokenizer, tokenizer.vocab_size)
    compiled = cache.get(Constraint.json_schema(SCHEMA))
    assert cache.get(Constraint.json_schema(json.dumps(SCHEMA))) is compiled  # one compile
    ids = tokenizer.encode(
        '{"name": "Ada", "age": 36, "role": "admin", "tags": ["x"], "ok": true}',
        add_special_tokens=False,
    )
    grammar = RequestGrammar(compiled)
    bits = torch.zeros((1, (tokenizer.vocab_size + 31) // 32), dtype=torch.int32)
    masks = []
    for n in range(len(ids) + 1):
        grammar.sync(ids[:n])  # one committed token at a time
        assert grammar.can_fill
        grammar.fill(bits, 0)
        masks.append(_allowed(bits))
        assert masks[-1]  # some token is allowed
        if n < len(ids):
            assert ids[n] in masks[-1]
    eos = min(tokenizer.eos_token_ids)
    assert masks[-1] == {eos}  # complete: EOS is forced
    assert all(eos not in m for m in masks[:-1])  # and never allowed before
    # Preemption or a rejected draft leaves fewer committed tokens: roll back to them.
    grammar.sync(ids[:5])
    assert grammar.num_accepted == 5
    grammar.fill(bits, 0)
    assert _allowed(bits) == masks[5]
    grammar.sync(ids)  # and forward again
    grammar.fill(bits, 0)
    assert _allowed(bits) == {eos}
    with pytest.raises(GenerationError):
        grammar.sync([*ids, ids[0]])  # a token the grammar does not allow
    assert cache.num_compiles == 1


def test_step_bitmask_gives_each_row_its_own_matchers_mask(tokenizer: Tokenizer) -> None:
    """Batches of 4 to 35 rows, constrained and not, into buffers reused (and grown) from
    step to step: every constrained row gets its own matcher's mask, in its own row."""
    constraint = Constraint.json_schema(SCHEMA)
    ids = tokenizer.encode(
        '{"name": "Ada", "age": 36, "role": "admin", "tags": ["x"], "ok": true}',
        add_special_tokens=False,
    )
    reference = RequestGrammar(GrammarCache(tokenizer, tokenizer.vocab_size).get(constraint))
    bits = torch.zeros((1, (tokenizer.vocab_size + 31) // 32), dtype=torch.int32)
    expected = []
    for n in range(len(ids) + 1):
        reference.sync(ids[:n])
        reference.fill(bits, 0)
        expected.append(_allowed(bits))

    grammars = Grammars(tokenizer, tokenizer.vocab_size)
    requests = []
    for k in range(35):  # every third one unconstrained
        request = SimpleNamespace(request_id=f"r{k}", output_token_ids=[])
        if k % 3:
            grammars.add(request.request_id, constraint)
        requests.append(request)
    done = requests[-1]  # its grammar accepted EOS: nothing may follow
    done.output_token_ids = [*ids, min(tokenizer.eos_token_ids)]

    for batch in (requests[:4], requests, requests[1:5], requests[:-1]):
        for k, request in enumerate(batch):
            if request is not done:
                request.output_token_ids = ids[: (k * 7 + len(batch)) % (len(ids) + 1)]
        mask, failed = grammars.bitmask(cast(list[Request], batch))
        assert mask is not None and mask.row_index is not None
        constrained = [k for k, r in enumerate(batch) if r.request_id in grammars]
        live = [k for k in constrained if batch[k] is not done]
        assert mask.rows == live and mask.row_index.tolist() == live
        assert list(failed) == ([done.request_id] if any(r is done for r in batch) else [])
        assert mask.bits.shape[0] == len(batch)
        for k in live:
            assert _allowed(mask.bits, k) == expected[len(batch[k].output_token_ids)], k


def test_cache_is_bounded(tokenizer: Tokenizer) -> None:
    cache = GrammarCache(tokenizer, tokenizer.vocab_size, capacity=2)
    first = cache.get(Constraint.regex("a+"))
    cache.get(Constraint.regex("b+"))
    cache.get(Constraint.regex("c+"))
    assert cache.get(Constraint.regex("a+")) is not first  # evicted, compiled again
    first.result()
    assert RequestGrammar(first).is_completed is False


def test_warm_builds_the_compiler_before_any_request(tokenizer: Tokenizer) -> None:
    grammars = Grammars(tokenizer, tokenizer.vocab_size)
    grammars.warm()
    cache = grammars.cache
    cache.warm().result()  # queued behind the first: both done once this one is
    assert cache._compiler is not None and cache.num_compiles == 0
    compiler = cache._compiler
    cache.get(Constraint.regex("a+")).result()
    assert cache._compiler is compiler and cache.num_compiles == 1  # built once
    Grammars(None, 8).warm()  # no tokenizer (a bare runner): nothing to warm, no error


# ---- the engine --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> LLM:
    return LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=256, max_model_len=512)


def _constrained(constraint: Constraint, n: int = 120, **kw: object) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, constraint=constraint, **kw)


def test_json_schema_output_parses_and_validates(tiny: LLM) -> None:
    outs = tiny.generate(PROMPTS, _constrained(Constraint.json_schema(SCHEMA)))
    for out in outs:
        assert out.finish_reason is FinishReason.EOS_TOKEN, out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_json_object_regex_and_choice(tiny: LLM) -> None:
    obj, rx, choice = tiny.generate(
        ["a", "b", "c"],
        [
            _constrained(Constraint.json_object(), n=60),
            _constrained(Constraint.regex(REGEX)),
            _constrained(Constraint.choice(["red", "green", "blue é"])),
        ],
    )
    if obj.finish_reason is FinishReason.EOS_TOKEN:  # free text may run past the cap
        assert isinstance(json.loads(obj.text), dict)
    else:
        assert obj.text.startswith("{")
    assert re.fullmatch(REGEX, rx.text) and rx.finish_reason is FinishReason.EOS_TOKEN
    assert choice.text in {"red", "green", "blue é"}


def test_unconstrained_rows_give_the_same_tokens_beside_constrained_ones(tiny: LLM) -> None:
    plain = SamplingParams(max_new_tokens=24, temperature=0.0)
    alone = tiny.generate(PROMPTS, plain)
    mixed = tiny.generate(
        PROMPTS * 2, [plain] * len(PROMPTS) + [_constrained(Constraint.json_schema(SCHEMA))] * 4
    )
    for a, b in zip(alone, mixed[: len(PROMPTS)], strict=True):
        assert a.token_ids == b.token_ids


def test_logprobs_are_the_constrained_distribution(tiny: LLM) -> None:
    out = tiny.generate(["x"], _constrained(Constraint.regex("[0-9]"), logprobs=True))[0]
    digit = out.tokens[0]
    assert digit.text.isdigit()
    # Ten digits share the mass: the pick is at least as likely as a tenth of it.
    assert digit.logprob is not None and digit.logprob >= -2.31


def test_preemption_keeps_constrained_output(tiny_model_dir: Path) -> None:
    prompts = [f"story {i}: " + "once upon a time " * (3 + i) for i in range(8)]
    params = _constrained(Constraint.regex("[0-9]{80}"), n=100)
    ample = LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=1024).generate(prompts, params)
    tight = LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=24, max_model_len=384)
    starved = tight.generate(prompts, params)
    assert tight.core.counters.num_preemptions > 0
    for a, b in zip(ample, starved, strict=True):
        assert a.token_ids == b.token_ids
        assert re.fullmatch("[0-9]{80}", b.text) and b.finish_reason is FinishReason.EOS_TOKEN
    assert tight.core.scheduler.block_manager.num_used_blocks == 0


def test_an_impossible_grammar_ends_with_one_error_and_the_engine_serves_on(tiny: LLM) -> None:
    with pytest.raises(GenerationError, match="allows no next token"):
        tiny.generate(["Hi"], _constrained(Constraint.grammar(IMPOSSIBLE)))
    assert tiny.core.scheduler.block_manager.num_used_blocks == 0
    assert not tiny.core.has_unfinished_requests()
    assert tiny.generate(["Hi"], SamplingParams(max_new_tokens=3, temperature=0.0))[0].token_ids


def test_max_tokens_cuts_a_constrained_generation(tiny: LLM) -> None:
    out = tiny.generate(["Hi"], _constrained(Constraint.json_schema(SCHEMA), n=3))[0]
    assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 3


@pytest.mark.timeout(180)
async def test_constraints_and_their_errors_cross_to_an_engine_process(
    tiny_model_dir: Path,
) -> None:
    """The spec pickles to the engine's own process, the grammar is compiled there, and an
    impossible grammar's error comes back in-band, once."""
    engine = AsyncEngine.from_config(
        EngineConfig(model=str(tiny_model_dir), dtype="float32", num_kv_blocks=128),
        own_process=True,
    )
    try:
        request = engine.make_request("Hi", _constrained(Constraint.regex(REGEX)))
        text = "".join([out.text async for out in engine.generate(request)])
        assert re.fullmatch(REGEX, text)
        bad = engine.make_request("Hi", _constrained(Constraint.grammar(IMPOSSIBLE)))
        outputs = []
        with pytest.raises(GenerationError, match="allows no next token"):
            async for out in engine.generate(bad):
                outputs.append(out)
        assert outputs == []
        with pytest.raises(ValidationError, match="invalid regex"):
            engine.make_request("Hi", _constrained(Constraint.regex("(abc")))
    finally:
        await engine.shutdown()
