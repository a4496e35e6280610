"""Constrained decoding: compiled grammars, one matcher per request, and the token bitmask.

Library: xgrammar (chosen by measurement, bench/RESULTS.md "Grammar libraries"): 4-12 us a
token to fill a mask on Qwen2.5's 151k vocabulary, where llguidance took 13-66 us, and a
33 MiB tokenizer view against 191 MiB. Its price is a compile of 13-85 ms per distinct
constraint, which is why compiles are cached and happen off the engine's step:

* :class:`GrammarCache` compiles on a worker thread, one future per distinct
  :class:`~rillet.constraint.Constraint` in a bounded LRU. The engine asks for a request's
  grammar when the request is added, so its compile overlaps its prefill; a step only
  waits for a compile that is still running when the request samples its first token.
  The compiler's view of the tokenizer (every token's text: ~1.7 s and 33 MiB on
  Qwen2.5's 151k vocabulary, with the library's import) is built on that thread when the
  engine loads (:meth:`GrammarCache.warm`), not by the first constrained request: that
  request's first token waited for it, and so did every stream in its batch.
* :class:`RequestGrammar` holds a request's matcher. It is brought in line with the
  request's *committed* output tokens before each mask (accepting new ones, rolling back
  if there are fewer), so chunked prefill, prefix-cache hits and preemption by recompute
  (which keeps the tokens) need nothing of their own.
* :class:`Grammars` is the model runner's book of them: per step it fills one bitmask row
  per constrained sampling row and names the rows whose grammar allows no token at all.

EOS is one of the grammar's stop tokens: allowed only where the grammar may end, and the
only token allowed once the output is complete, so a finished grammar stops the request.
Special tokens other than EOS are never allowed. JSON is generated on one line with
json.dumps' separators: free whitespace lets small models loop on newlines.

:func:`check_constraint` is the edge's early check (a 422 before any byte is streamed): it
parses the constraint into a grammar without a tokenizer, which takes well under a
millisecond, and caches the verdict.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import torch

from rillet.constraint import Constraint, ConstraintKind
from rillet.engine.schema_support import check_schema_support
from rillet.errors import GenerationError, RilletError, ValidationError

if TYPE_CHECKING:
    from rillet.engine.request import Request
    from rillet.tokenizer import Tokenizer

log = logging.getLogger("rillet.engine")

#: Distinct constraints kept compiled. A running request holds its own grammar, so an
#: entry evicted while in use costs only a recompile for the next request that asks.
GRAMMAR_CACHE_SIZE = 64


def _xgr() -> ModuleType:
    """xgrammar, imported on first use: it brings transformers along (~1.5 s, ~50 MiB),
    which a server that never sees a constraint should not pay for."""
    import xgrammar

    return xgrammar


def import_library() -> None:
    """Import the grammar library now (``AsyncEngine`` does, on a thread of its own)."""
    _xgr()


def _grammar(constraint: Constraint) -> Any:
    """The constraint as an ``xgrammar.Grammar``; raises the library's error if invalid."""
    xgr = _xgr()
    kind, value = constraint.kind, constraint.value
    if kind is ConstraintKind.JSON_SCHEMA:
        return xgr.Grammar.from_json_schema(value, any_whitespace=False)
    if kind is ConstraintKind.JSON_OBJECT:
        return xgr.Grammar.from_json_schema('{"type":"object"}', any_whitespace=False)
    if kind is ConstraintKind.REGEX:
        return xgr.Grammar.from_regex(value)
    if kind is ConstraintKind.CHOICE:
        # JSON string literals are EBNF string literals (same quotes and escapes).
        options = json.loads(value)
        return xgr.Grammar.from_ebnf(
            "root ::= " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options)
        )
    if kind is ConstraintKind.STRUCTURAL_TAG:
        return xgr.Grammar.from_structural_tag(value)
    return xgr.Grammar.from_ebnf(value)


@functools.lru_cache(maxsize=256)
def check_constraint(constraint: Constraint) -> None:
    """Raise ValidationError if ``constraint`` does not parse (bad schema, regex, EBNF), or
    if it holds a JSON Schema keyword the library would silently not enforce."""
    for schema in _schemas(constraint):
        check_schema_support(schema)
    try:
        _grammar(constraint)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValidationError(f"invalid {constraint.kind.value}: {_reason(exc)}") from None


def _schemas(constraint: Constraint) -> list[Any]:
    """The JSON schemas inside ``constraint``: itself, or a structural tag's values."""
    if constraint.kind is ConstraintKind.JSON_SCHEMA:
        return [json.loads(constraint.value)]
    if constraint.kind is not ConstraintKind.STRUCTURAL_TAG:
        return []
    found: list[Any] = []
    pending: list[Any] = [json.loads(constraint.value)]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if node.get("type") == "json_schema" and "json_schema" in node:
                found.append(node["json_schema"])
            else:
                pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return found


def _reason(exc: BaseException) -> str:
    """The library's message without its ``[time] file.cc:line:`` prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    head, sep, tail = text.partition(": ")
    return tail if sep and head.startswith("[") else text


class GrammarCache:
    """Compiled grammars for one tokenizer: a bounded LRU of futures, compiled off-step."""

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, capacity: int = GRAMMAR_CACHE_SIZE
    ) -> None:
        """``vocab_size`` is the model's (the logits' width), which may exceed the
        tokenizer's; the ids past the tokenizer's are never allowed."""
        self.vocab_size = vocab_size
        self.capacity = capacity
        self._tokenizer = tokenizer
        self._entries: OrderedDict[Constraint, Future[Any]] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rillet-grammar")
        self._compiler: Any = None
        self.num_compiles = 0

    def get(self, constraint: Constraint) -> Future[Any]:
        """The compiled grammar of ``constraint`` (a future: the compile may be running)."""
        future = self._entries.get(constraint)
        if future is not None:
            self._entries.move_to_end(constraint)
            return future
        future = self._pool.submit(self._compile, constraint)
        self._entries[constraint] = future
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return future

    def warm(self) -> Future[None]:
        """Build the compiler (the library's import and its tokenizer view) on the worker
        thread now; a compile asked for meanwhile queues behind it."""
        return self._pool.submit(self._ensure_compiler)

    def _ensure_compiler(self) -> None:
        if self._compiler is None:
            start = time.perf_counter()
            self._compiler = self._make_compiler()
            log.info(
                "grammar compiler ready: %d-token view in %.2f s",
                self.vocab_size,
                time.perf_counter() - start,
            )

    def _compile(self, constraint: Constraint) -> Any:
        self._ensure_compiler()
        self.num_compiles += 1
        try:
            return self._compiler.compile_grammar(_grammar(constraint))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValidationError(f"invalid {constraint.kind.value}: {_reason(exc)}") from None

    def _make_compiler(self) -> Any:
        xgr = _xgr()
        tok = self._tokenizer
        stop_ids = sorted(tok.eos_token_ids)
        # An empty string marks a token xgrammar never allows: the specials (chat markers
        # have no place inside JSON) and the padding rows past the tokenizer's vocabulary.
        hidden = tok.special_ids - tok.eos_token_ids
        vocab = [
            "" if i in hidden else (tok.backend.id_to_token(i) or "")
            for i in range(self.vocab_size)
        ]
        # The byte-level / byte-fallback detection xgrammar's from_huggingface uses.
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok.backend.to_str())
        info = xgr.TokenizerInfo(
            vocab,
            meta["vocab_type"],
            vocab_size=self.vocab_size,
            stop_token_ids=stop_ids,
            add_prefix_space=meta["add_prefix_space"],
        )
        # Our LRU is the cache; two threads bound the compile's share of a small machine.
        return xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)


class RequestGrammar:
    """One request's matcher, kept in step with its committed output tokens."""

    def __init__(self, compiled: Future[Any]) -> None:
        self._compiled = compiled
        self._matcher: Any = None
        self.num_accepted = 0

    def sync(self, output_token_ids: Sequence[int]) -> None:
        """Accept the committed tokens not yet seen; roll back any no longer committed.

        Raises the compile's ValidationError, or GenerationError if a committed token is
        not one the grammar allows (it cannot be, when it was sampled under the mask).
        """
        if self._matcher is None:
            self._matcher = _xgr().GrammarMatcher(self._compiled.result())
        extra = self.num_accepted - len(output_token_ids)
        if extra > 0:
            self._matcher.rollback(extra)
            self.num_accepted -= extra
        for token_id in output_token_ids[self.num_accepted :]:
            if not self._matcher.accept_token(token_id):
                raise GenerationError(f"token {token_id} breaks the request's grammar")
            self.num_accepted += 1

    @property
    def can_fill(self) -> bool:
        """Whether a next token may follow (not once the grammar accepted EOS)."""
        return not self._matcher.is_terminated()

    def fill(self, bits: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bits[row]`` (only while :attr:`can_fill`).

        Whether any is allowed is the caller's check: :meth:`Grammars.bitmask` makes it
        for all its rows at once (64 rows: 31 us in one numpy call, 147 us row by row)."""
        self._matcher.fill_next_token_bitmask(bits, row)

    @property
    def is_completed(self) -> bool:
        return self._matcher is not None and bool(self._matcher.is_completed())


@dataclass
class TokenBitmask:
    """Allowed next tokens for some rows of a batch: bit ``t % 32`` of ``bits[r, t // 32]``
    is set when token ``t`` may follow in row ``r``; only ``rows`` are masked."""

    bits: torch.Tensor  # [B, ceil(V / 32)] int32
    rows: list[int]
    #: ``rows`` as an int64 tensor, when the maker has one at hand (the native kernel's
    #: input); built from ``rows`` otherwise.
    row_index: torch.Tensor | None = None


#: Masked rows from which the mask is applied on two threads. The library's CPU kernel
#: runs one row at a time with the GIL released, and nothing else runs while it does: 64
#: rows of SmolLM2's 49k took 18.5 ms on one thread and 7.7 ms split in two (loaded
#: machine), where one row takes ~0.1-0.5 ms, which is what a thread hand-off is worth.
SPLIT_APPLY_ROWS = 8
_apply_pool: ThreadPoolExecutor | None = None


def apply_token_bitmask(
    logits: torch.Tensor, mask: TokenBitmask, native: ModuleType | None = None
) -> None:
    """Set the disallowed tokens of ``mask.rows`` to -inf, in place (float32 ``logits``).

    On a CPU with the compiled kernels (``native``, ``cpu_kernels.load()``) this is rillet's
    own kernel (csrc/token_mask.cpp: 64 rows of 49k tokens in 0.55 ms against
    xgrammar's 7.7-18.5 ms); elsewhere xgrammar's."""
    global _apply_pool
    if native is not None and logits.device.type == "cpu":
        rows = mask.row_index
        if rows is None:
            rows = torch.tensor(mask.rows, dtype=torch.int64)
        native.apply_token_bitmask(logits, mask.bits.contiguous(), rows)
        return
    bits = mask.bits.to(logits.device)
    apply = functools.partial(_xgr().apply_token_bitmask_inplace, logits, bits)
    vocab_size = logits.shape[1]
    if logits.device.type != "cpu" or len(mask.rows) < SPLIT_APPLY_ROWS:
        apply(vocab_size=vocab_size, indices=mask.rows)
        return
    if _apply_pool is None:
        _apply_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rillet-mask")
    # Every other row to the helper thread, the rest here: the halves cost about the same.
    helper = _apply_pool.submit(apply, vocab_size=vocab_size, indices=mask.rows[1::2])
    apply(vocab_size=vocab_size, indices=mask.rows[::2])
    helper.result()


class Grammars:
    """The model runner's request grammars, and the step's bitmask.

    The bitmask and its row index live in buffers kept from step to step (grown when a
    batch outgrows them): a :class:`TokenBitmask` is valid until the next :meth:`bitmask`
    call, which the engine makes only after the step's sampling has used it.
    """

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int) -> None:
        """Without a tokenizer (a bare runner in tests), constraints are refused."""
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._cache: GrammarCache | None = None
        self._requests: dict[str, RequestGrammar] = {}
        self._bits = torch.empty((0, (vocab_size + 31) // 32), dtype=torch.int32)
        self._index = torch.empty(0, dtype=torch.int64)

    @property
    def cache(self) -> GrammarCache:
        if self._tokenizer is None:
            raise ValidationError("this engine cannot apply grammar constraints")
        if self._cache is None:
            self._cache = GrammarCache(self._tokenizer, self.vocab_size)
        return self._cache

    def warm(self) -> None:
        """Have the compiler ready before the first constrained request (in the
        background); nothing without a tokenizer."""
        if self._tokenizer is not None:
            self.cache.warm()

    def add(self, request_id: str, constraint: Constraint) -> None:
        """Start (or reuse) the compile of a new request's grammar."""
        self._requests[request_id] = RequestGrammar(self.cache.get(constraint))

    def release(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def _buffers(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The bitmask [batch, words] and row-index buffers, grown to hold ``batch`` rows."""
        if self._bits.shape[0] < batch:
            size = max(batch, 2 * self._bits.shape[0], 8)
            self._bits = torch.empty((size, self._bits.shape[1]), dtype=torch.int32)
            self._index = torch.empty(size, dtype=torch.int64)
        return self._bits[:batch], self._index

    def bitmask(
        self, requests: Sequence[Request]
    ) -> tuple[TokenBitmask | None, dict[str, RilletError]]:
        """The mask for a step whose sampling rows are ``requests`` (in row order), and the
        requests that cannot go on (no token allowed, or their grammar failed)."""
        rows = [i for i, r in enumerate(requests) if r.request_id in self._requests]
        if not rows:
            return None, {}
        bits, index = self._buffers(len(requests))
        ready: list[int] = []
        failed: dict[str, RilletError] = {}
        for i in rows:
            request = requests[i]
            grammar = self._requests[request.request_id]
            try:
                grammar.sync(request.output_token_ids)
            except RilletError as exc:
                failed[request.request_id] = exc
                continue
            if grammar.can_fill:
                ready.append(i)
            else:
                failed[request.request_id] = _no_token()
        if not ready:
            return TokenBitmask(bits, []), failed
        # Every row is filled here, on the engine's thread, one after another; not by
        # xgrammar's BatchGrammarMatcher on its thread pool: on two cores the pool's threads
        # wait for cores that torch's OpenMP threads hold (most likely still spinning after
        # the forward). 64 rows of `rillet bench`'s schema took 1.1-2.0 ms a step in one batch
        # call and 0.5 ms in this loop (~8 us a row), and the whole decode step went from
        # 49.0-54.6 ms to 47.8 ms against 46.8 ms unconstrained (bench/profile_step.py 64
        # --json-schema, bench/RESULTS.md "Constrained decoding at c = 64"). At c = 1 the
        # pool's hand-off had cost 80-190 us a token against the loop's 7-8 us.
        for i in ready:
            self._requests[requests[i].request_id].fill(bits, i)
        # numpy, not torch: at one row, torch's indexing and any() cost more than the fill.
        any_allowed = cast(list[bool], bits.numpy()[ready].any(axis=1).tolist())
        masked: list[int] = []
        for i, allowed in zip(ready, any_allowed, strict=True):
            if allowed:
                masked.append(i)
            else:
                failed[requests[i].request_id] = _no_token()
        index.numpy()[: len(masked)] = masked
        return TokenBitmask(bits, masked, index[: len(masked)]), failed


def _no_token() -> GenerationError:
    return GenerationError("the grammar allows no next token: generation cannot continue")
