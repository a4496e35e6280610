"""A fake engine made of rillet's own protocol types, for fast tests of the layers above it.

It has the interface the generation service needs (``EngineLike``): a real ``Tokenizer``
(one token per character, built in memory, with ChatML's special tokens), its vocabulary
size (the service checks prompt token ids against it), and ``generate`` answering from a
script instead of a model. Tests hold it: with :meth:`FakeEngine.pause`, every request
stops after its first output and waits until :meth:`resume` or :meth:`step`, so a test
decides when a stream ends instead of racing it. Used by unit tests of the service and the
doors only; the integration tests run the real engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import string
import time
from collections.abc import AsyncGenerator
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from rillet.engine.core_loop import EngineStats
from rillet.errors import IncompleteGenerationError, RilletError
from rillet.protocol import EngineRequest, FinishReason, GeneratedToken, RequestOutput
from rillet.tokenizer import Tokenizer

SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
EOS_ID = 2
#: What every request answers, one character per token, unless a test sets ``reply``.
DEFAULT_REPLY = "Hello world"


def char_tokenizer() -> Tokenizer:
    """One token per character of printable ASCII; ``<|im_end|>`` is EOS."""
    alphabet = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {token: i for i, token in enumerate([*SPECIALS, *alphabet])}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    return Tokenizer(backend, eos_token_ids=[EOS_ID])


def engine_stats(
    num_running: int = 0, num_waiting: int = 0, kv_cache_usage: float = 0.0, **fields: Any
) -> EngineStats:
    """The engine's own stats type, with every count a test leaves out at zero (so a field
    the engine adds needs no copy here)."""
    counts = (
        "num_used_blocks",
        "num_prefix_hit_tokens",
        "num_computed_tokens",
        "num_prompt_tokens_computed",
        "num_generated_tokens",
        "num_preemptions",
        "num_steps",
    )
    zeros: dict[str, Any] = dict.fromkeys(counts, 0)
    return EngineStats(num_running, num_waiting, kv_cache_usage, **{**zeros, **fields})


class FakeEngine:
    """Answers every request with ``reply`` (cut at ``max_new_tokens``), one token per output."""

    def __init__(self, max_model_len: int = 256, model_name: str = "fake-model") -> None:
        self.tokenizer = char_tokenizer()
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = self.tokenizer.vocab_size
        #: The model's sampling defaults, as a generation_config.json would give them.
        self.generation_defaults: dict[str, object] = {}
        self.reply = DEFAULT_REPLY
        #: Raised in place of the output after this many tokens (None: no failure).
        self.fail_after: tuple[int, RilletError] | None = None
        self.requests: list[EngineRequest] = []
        self.running: dict[str, EngineRequest] = {}
        self.aborted: list[str] = []
        self.finished: list[str] = []
        #: Outputs each request has produced so far.
        self.num_outputs: dict[str, int] = {}
        #: What stats() reports of the queue and the engine's speed: tests set them, so the
        #: service's first-token prediction is fixed (0.0: not measured, no prediction).
        self.queue = engine_stats()
        self._healthy = True
        self.restarts = 0
        self._paused = False
        self._first_allowed = 1
        #: While paused: how many outputs each request may have produced.
        self._allowed: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._shutdown = False
        #: When a test sets it, an aborted request's clean-up waits for it (after setting
        #: ``aborting``), so the test can act while that clean-up is under way.
        self.hold_aborts: asyncio.Event | None = None
        self.aborting = asyncio.Event()
        #: The engine's step counter: one step per output of any request.
        self.num_steps = 0

    # ---- what tests drive -------------------------------------------------------------

    def pause(self, before_first: bool = False) -> None:
        """From now on, each request stops after its outputs so far (a new one after its
        first, or before it with ``before_first``: a request still queued) until
        :meth:`step` or :meth:`resume`."""
        self._paused = True
        self._first_allowed = 0 if before_first else 1
        self._allowed = {rid: max(1, n) for rid, n in self.num_outputs.items()}

    def resume(self) -> None:
        """Let every request run to its end."""
        self._paused = False
        self._wake()

    async def step(self) -> None:
        """Let every running request produce one more output; return once each has."""
        before = {rid: self.num_outputs[rid] for rid in self.running}
        for rid, count in before.items():
            self._allowed[rid] = count + 1
        self._wake()
        while any(rid in self.running and self.num_outputs[rid] == n for rid, n in before.items()):
            await asyncio.sleep(0.001)

    async def wait_running(self, count: int) -> None:
        """Until ``count`` requests are running and have each produced an output."""
        while sum(1 for rid in self.running if self.num_outputs[rid]) < count:
            await asyncio.sleep(0.001)

    # ---- EngineLike -------------------------------------------------------------------

    async def generate(
        self,
        request: EngineRequest,
        max_buffer_bytes: int | None = None,
        max_hold_steps: int = 1,
    ) -> AsyncGenerator[RequestOutput, None]:
        """The reply, one output per token. Each waits for its reader (no collector here,
        so ``max_buffer_bytes`` and ``max_hold_steps`` mean nothing): the stalled-reader
        and merging tests run the real ``AsyncEngine`` over a stepped core instead
        (``stepped_engine.py``)."""
        if self._shutdown:
            raise IncompleteGenerationError("the server is shutting down")
        rid = request.request_id
        self.requests.append(request)
        cap = request.params.max_new_tokens or len(self.reply)
        text = self.reply[:cap]
        finished = False
        self.num_outputs[rid] = 0
        self._allowed.setdefault(rid, self._first_allowed)
        self.running[rid] = request
        try:
            await self._wait_turn(rid)  # held before its first output (pause(before_first))
            scheduled = time.monotonic()  # its queue time ends, as a real engine reports
            for i, char in enumerate(text):
                if self.fail_after is not None and i == self.fail_after[0]:
                    finished = True
                    raise self.fail_after[1]
                last = i == len(text) - 1
                reason = None
                if last:
                    reason = FinishReason.LENGTH if len(text) == cap else FinishReason.EOS_TOKEN
                token_id = self.tokenizer.encode(char, add_special_tokens=False)[0]
                finished = last
                self.num_outputs[rid] = i + 1
                self.num_steps += 1
                yield RequestOutput(
                    request_id=rid,
                    tokens=[GeneratedToken(token_id, char, -0.5, False)],
                    text=char,
                    finish_reason=reason,
                    num_prompt_tokens=len(request.prompt_token_ids),
                    num_generated_tokens=i + 1,
                    first_scheduled_time=scheduled if i == 0 else None,
                    step=self.num_steps,
                    first_token_time=time.monotonic() if i == 0 else None,
                )
                if not last:
                    await self._wait_turn(rid)
        finally:
            try:
                if not finished and self.hold_aborts is not None:
                    self.aborting.set()
                    await self.hold_aborts.wait()
            finally:
                del self.running[rid]
                (self.finished if finished else self.aborted).append(rid)

    async def _wait_turn(self, rid: str) -> None:
        """Before a request's next output: wait while paused and it has used its turns."""
        while self._paused and not self._shutdown and self.num_outputs[rid] >= self._allowed[rid]:
            changed = self._changed
            await changed.wait()
        if self._shutdown:
            raise IncompleteGenerationError("the server is shutting down")
        await asyncio.sleep(0)

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def stats(self) -> EngineStats:
        return dataclasses.replace(self.queue, num_running=len(self.running))

    @property
    def is_healthy(self) -> bool:
        return self._healthy and not self._shutdown

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Open streams end with IncompleteGenerationError, as the real engine's do."""
        self._shutdown = True
        self._wake()
