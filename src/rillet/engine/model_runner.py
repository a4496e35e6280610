"""Turn one scheduled step into tensors, run the model, sample. The only owner of torch state.

Batch layout, matching ``models.attention``: decode rows first (one token each), then each
multi-token chunk's rows. Rows that end a request's known tokens sample a token; for the
rest (partial prefill chunks) only the KV cache is written. A speculative row (a decode with
k draft tokens) is k + 1 decode rows of one sequence, at positions p .. p + k, each with its
own context length (``AttentionMetadata.decode_seq_starts``): it runs on the decode kernel,
which reads the context once for all of them, and the linear layers see k + 1 more rows of
a small batch (on a memory-bound CPU step, nearly free). It samples at its last known token
and at every draft: the scheduler compares those choices with the drafts. With a draft
model, its drafts are made first, in the same step (``engine/draft_model.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate
from types import ModuleType
from typing import Protocol

import torch

from rillet.engine.grammar import Grammars
from rillet.engine.request import Request
from rillet.engine.sampler import MIN_TEMPERATURE, Sampler, SamplingRow
from rillet.engine.scheduler import ScheduledRequest, SchedulerOutput
from rillet.engine.speculation import DraftTiming
from rillet.errors import RilletError
from rillet.models.attention import (
    AttentionMetadata,
    KVCache,
    NativePrefills,
    PrefillChunk,
    allocate_kv_caches,
)
from rillet.models.causal_lm import CausalLM
from rillet.protocol import TopLogprob
from rillet.tokenizer import Tokenizer


@dataclass
class StepResult:
    """What the model produced this step, keyed by request id (only requests that sampled).

    One entry per sampled position: one for a plain row, ``1 + len(drafts)`` for a
    speculative row.
    """

    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[float]] = field(default_factory=dict)
    top_logprobs: dict[str, list[list[TopLogprob]]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[float | None]] = field(default_factory=dict)
    #: Requests that sampled nothing and cannot go on (their grammar allows no token).
    failed: dict[str, RilletError] = field(default_factory=dict)


class Drafter(Protocol):
    """What fills a step's pending draft slots before the forward (``engine/draft_model.py``)."""

    def propose(self, scheduled: list[ScheduledRequest]) -> None: ...

    def release(self, request_id: str) -> None: ...

    def take_timing(self) -> DraftTiming: ...


class InjectedFault(RuntimeError):
    """What ``fail_forward_at_batch_size`` raises (tests of the engine's fault handling)."""


class ModelRunner:
    """Holds the model, its paged KV cache and the sampler; ``execute`` runs one step."""

    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        kv_dtype: torch.dtype | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
        seed: int | None = None,
        native: ModuleType | None = None,
        small_batch_tokens: int = 0,
        fail_at_batch_size: int | None = None,
        tokenizer: Tokenizer | None = None,
        drafter: Drafter | None = None,
    ) -> None:
        """``tokenizer`` enables grammar constraints (their masks are built from its
        vocabulary); without one, a constrained request is refused. ``drafter`` fills the
        draft slots a draft model's rows carry (``--speculative draft:NAME``)."""
        cfg = model.config
        self.eos_token_ids = tuple(sorted(eos_token_ids))
        self.model = model
        self.block_size = block_size
        self.device = device
        self.kv_caches: list[KVCache] = allocate_kv_caches(
            cfg.num_layers,
            num_blocks,
            block_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            kv_dtype or model.dtype,
            device,
        )
        model.decoder_stack = model.build_decoder_stack(self.kv_caches, native)
        self.sampler = Sampler(device=device, seed=seed, native=native)
        self.native = native  # compiled CPU kernels (``cpu_kernels.load``), or None
        self.max_threads = torch.get_num_threads()
        self.small_batch_tokens = small_batch_tokens
        #: Fault injection (EngineConfig.fail_forward_at_batch_size): fires once.
        self.fail_at_batch_size = fail_at_batch_size
        self._generators: dict[str, torch.Generator | None] = {}
        # Prompt logits are kept per request until its prompt is fully computed, so
        # prompt logprobs work across chunked prefill.
        self._prompt_logprob_parts: dict[str, list[float | None]] = {}
        self.grammars = Grammars(tokenizer, cfg.vocab_size)
        self.drafter = drafter

    def add_request(self, request: Request) -> None:
        """Per-request state that is worth starting early: a constraint's compile."""
        if request.params.constraint is not None:
            self.grammars.add(request.request_id, request.params.constraint)

    def release(self, request_id: str) -> None:
        """Forget per-request state (generator, partial prompt logprobs, grammar)."""
        self._generators.pop(request_id, None)
        self._prompt_logprob_parts.pop(request_id, None)
        self.grammars.release(request_id)
        if self.drafter is not None:
            self.drafter.release(request_id)

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> StepResult:
        if self.drafter is not None:
            self.drafter.propose(step.scheduled)  # the draft model's tokens, in this step
        # Decode rows go first (speculative ones included): attention batches them in one call.
        scheduled = sorted(step.scheduled, key=lambda s: not s.is_decode)
        self._pick_threads(step.num_batched_tokens)
        input_ids, positions, slots = self._flat_inputs(scheduled)
        meta = self._attention_metadata(scheduled, slots, positions)
        if self.fail_at_batch_size == len(scheduled):
            self.fail_at_batch_size = None
            raise InjectedFault(f"a fault injected into the forward of {len(scheduled)} requests")
        hidden = self.model(input_ids, self.kv_caches, meta)

        result = StepResult()
        row_ends = _row_ends(scheduled)
        self._collect_prompt_logprobs(scheduled, hidden, row_ends, result)
        samplers = [i for i, s in enumerate(scheduled) if s.samples]
        if not samplers:
            return result
        # A row samples at its last known token and after each draft (only rows without
        # penalties or a grammar carry drafts, so one SamplingRow serves all its positions).
        widths = [1 + len(scheduled[i].draft_token_ids) for i in samplers]
        rows_index = torch.tensor(
            [row_ends[i] - w + j for i, w in zip(samplers, widths, strict=True) for j in range(w)],
            device=self.device,
        )
        logits = self.model.compute_logits(hidden.index_select(0, rows_index))
        requests = [scheduled[i].request for i in samplers]
        rows = [self._sampling_row(r) for r in requests]
        spread = [r for r, w in zip(requests, widths, strict=True) for _ in range(w)]
        allowed, result.failed = self.grammars.bitmask(spread)
        rewinds = _seeded_speculative_rows(rows, widths)
        out = self.sampler(
            logits, [x for x, w in zip(rows, widths, strict=True) for _ in range(w)], allowed
        )
        for i, state in rewinds.items():
            drafts = scheduled[samplers[i]].draft_token_ids
            first = sum(widths[:i])
            _rewind(rows[i], state, out.token_ids[first : first + widths[i]], drafts, logits)
        end = 0
        for request, width in zip(requests, widths, strict=True):
            start, end = end, end + width
            rid = request.request_id
            if rid in result.failed:
                continue  # its row was sampled unmasked: the token is discarded
            result.sampled[rid] = out.token_ids[start:end]
            if out.logprobs is not None:
                result.logprobs[rid] = out.logprobs[start:end]
            if out.top_logprobs is not None and out.top_logprobs[start]:
                result.top_logprobs[rid] = out.top_logprobs[start:end]
        return result

    def _pick_threads(self, num_tokens: int) -> None:
        """One CPU thread for steps of at most ``small_batch_tokens`` tokens, all otherwise.

        With the engine on a thread of the server process, small steps were faster on one
        thread (19.7 against 15.9 ms a token): the HTTP thread woke once per token, took a
        core, and each of the step's ~150 parallel regions waited for its descheduled team
        member. In its own process all threads win at every size, so ``rillet serve``
        defaults to 0. Measured in bench/RESULTS.md.
        """
        if self.device.type != "cpu" or self.max_threads <= 1:
            return
        wanted = 1 if num_tokens <= self.small_batch_tokens else self.max_threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def _flat_inputs(
        self, scheduled: list[ScheduledRequest]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        bs = self.block_size
        for s in scheduled:
            req, start, end = s.request, s.start_position, s.start_position + s.num_new_tokens
            ids.extend(s.token_ids)
            positions.extend(range(start, end))
            blocks = req.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
        dev = self.device
        return (
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            torch.tensor(slots, dtype=torch.long, device=dev),
        )

    def _block_table(self, requests: list[Request], context_lens: list[int]) -> torch.Tensor:
        """[N, max blocks] ids of the blocks holding each request's first context_lens tokens.

        Rows are padded with block 0; the mask hides whatever the padding holds.
        """
        bs = self.block_size
        num_blocks = (max(context_lens) + bs - 1) // bs
        return torch.tensor(
            [r.block_ids[:num_blocks] + [0] * (num_blocks - len(r.block_ids)) for r in requests],
            dtype=torch.long,
            device=self.device,
        )

    def _attention_metadata(
        self, scheduled: list[ScheduledRequest], slots: torch.Tensor, positions: torch.Tensor
    ) -> AttentionMetadata:
        meta = AttentionMetadata(slot_mapping=slots, positions=positions, native=self.native)
        decodes = [s for s in scheduled if s.is_decode]
        if decodes:
            # A speculative row's positions p .. p + k attend to p + 1 .. p + k + 1 keys.
            lens = [s.start_position + 1 + i for s in decodes for i in range(s.num_new_tokens)]
            per_row = [s.request for s in decodes for _ in range(s.num_new_tokens)]
            meta.num_decode_tokens = len(lens)
            meta.decode_block_ids = self._block_table(per_row, lens)
            lens_t = torch.tensor(lens, device=self.device)
            meta.decode_context_lens = lens_t
            if len(lens) > len(decodes):
                starts = [0, *accumulate(s.num_new_tokens for s in decodes)]
                meta.decode_seq_starts = torch.tensor(starts, dtype=torch.long, device=self.device)
            if self.native is None:  # only the SDPA fallback reads a mask
                width = meta.decode_block_ids.shape[1] * self.block_size
                mask = torch.arange(width, device=self.device).unsqueeze(0) < lens_t.unsqueeze(1)
                meta.decode_mask = mask.view(len(lens), 1, 1, width)
        prefills = scheduled[len(decodes) :]
        if prefills and self.native is not None:
            meta.native_prefills = self._native_prefills(prefills)
        row = meta.num_decode_tokens
        for s in prefills:
            chunk = PrefillChunk(
                query_start=row, query_len=s.num_new_tokens, start_position=s.start_position
            )
            if s.start_position > 0 and self.native is None:
                context_len = s.start_position + s.num_new_tokens
                chunk.context_block_ids = self._block_table([s.request], [context_len])[0]
                width = chunk.context_block_ids.shape[0] * self.block_size
                q_pos = torch.arange(s.start_position, context_len, device=self.device)
                k_pos = torch.arange(width, device=self.device)
                chunk.mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
            meta.prefills.append(chunk)
            row += s.num_new_tokens
        return meta

    def _native_prefills(self, prefills: list[ScheduledRequest]) -> NativePrefills:
        """The chunks as the native kernel reads them: no masks, every context in the cache."""
        lens = [s.num_new_tokens for s in prefills]
        starts = [0, *accumulate(lens[:-1])]
        positions = [s.start_position for s in prefills]
        ends = [p + n for p, n in zip(positions, lens, strict=True)]
        as_tensor = partial(torch.tensor, dtype=torch.long, device=self.device)
        return NativePrefills(
            block_ids=self._block_table([s.request for s in prefills], ends),
            query_starts=as_tensor(starts),
            query_lens=as_tensor(lens),
            start_positions=as_tensor(positions),
        )

    def _sampling_row(self, req: Request) -> SamplingRow:
        rid = req.request_id
        if rid not in self._generators:
            self._generators[rid] = Sampler.make_generator(req.params.seed, self.device)
        suppress: tuple[int, ...] = ()
        if req.num_output_tokens < req.params.min_tokens:
            # min_tokens forbids every token that would end the request early.
            suppress = (*self.eos_token_ids, *req.params.stop_token_ids)
        return SamplingRow(
            params=req.params,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=req.output_token_ids,
            generator=self._generators[rid],
            suppress_token_ids=suppress,
        )

    def _collect_prompt_logprobs(
        self,
        scheduled: list[ScheduledRequest],
        hidden: torch.Tensor,
        row_ends: list[int],
        result: StepResult,
    ) -> None:
        """Logprob of each prompt token given the ones before it, gathered chunk by chunk."""
        for i, s in enumerate(scheduled):
            req = s.request
            if not req.params.prompt_logprobs or s.start_position >= req.num_prompt_tokens:
                continue
            rid = req.request_id
            parts = self._prompt_logprob_parts.setdefault(rid, [None])
            num_prompt = req.num_prompt_tokens
            end = min(s.start_position + s.num_new_tokens, num_prompt)
            # The row at position p predicts prompt token p + 1.
            first_row = row_ends[i] - s.num_new_tokens
            positions = range(s.start_position, min(end, num_prompt - 1))
            if len(positions) > 0:
                rows = torch.arange(len(positions), device=self.device) + first_row
                logits = self.model.compute_logits(hidden.index_select(0, rows))
                targets = req.prompt_token_ids[positions.start + 1 : positions.stop + 1]
                parts.extend(self.sampler.prompt_logprobs_for(logits, targets))
            if end == num_prompt:
                result.prompt_logprobs[rid] = self._prompt_logprob_parts.pop(rid)


def _seeded_speculative_rows(rows: list[SamplingRow], widths: list[int]) -> dict[int, torch.Tensor]:
    """Generator states, before this step's draws, of the seeded sampled rows with drafts."""
    return {
        i: row.generator.get_state()
        for i, (row, width) in enumerate(zip(rows, widths, strict=True))
        if width > 1 and row.generator is not None and row.params.temperature >= MIN_TEMPERATURE
    }


def _rewind(
    row: SamplingRow,
    state: torch.Tensor,
    chosen: list[int],
    drafts: list[int],
    logits: torch.Tensor,
) -> None:
    """Leave a seeded row's generator where drawing only the positions it keeps would have.

    The sampler drew every position of the row in order, V uniforms each, as it draws one
    position a step without drafts; the positions after the first rejected draft are
    thrown away. Replaying the kept positions' draws makes a seeded request's tokens the
    same with and without speculation (and whatever its drafts were).
    """
    kept = 1
    while kept < len(chosen) and chosen[kept - 1] == drafts[kept - 1]:
        kept += 1
    assert row.generator is not None
    row.generator.set_state(state)
    scratch = torch.empty(logits.shape[1], dtype=torch.float32, device=logits.device)
    for _ in range(kept):
        scratch.uniform_(generator=row.generator)


def _row_ends(scheduled: list[ScheduledRequest]) -> list[int]:
    ends, total = [], 0
    for s in scheduled:
        total += s.num_new_tokens
        ends.append(total)
    return ends
