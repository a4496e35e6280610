"""The draft-model proposer: a smaller model of the same tokenizer drafts ``k`` tokens per
speculating row, in the step that verifies them, before the target's forward.

The scheduler gives a speculating row ``k`` pending draft slots (``engine/speculation.py``
decides ``k``); :meth:`DraftModelProposer.propose` fills them. The draft model is a
:class:`~rillet.engine.model_runner.ModelRunner` of its own, with its own (small) paged KV
cache and block manager, so its forwards are the target's machinery: the same batch layout,
kernels and greedy sampler.

Per request the draft keeps a *shadow* :class:`~rillet.engine.request.Request`: the
target's committed tokens, then the drafts it proposed last, with the draft cache's block
table. Each step, for the rows that speculate:

1. Sync: the shadow keeps the longest prefix of its tokens the target committed (drafts the
   target accepted have the right KV already), drops the rest, and gives back the blocks
   past it (rejected drafts' slots); then it takes the target's tokens after that prefix.
2. Forward 1 computes what the draft has not seen (a whole prompt the first time, chunked
   to ``max_num_batched_tokens``; else the accepted drafts and the target's token) and
   samples draft 1. Forwards 2 .. k are decode rows of one token, each sampling the next
   draft; a row leaves the batch once it has its ``k``.

A request the policy does not let speculate costs the draft nothing; when it speculates
again, forward 1 catches up. Prefix caching stays off in the draft cache: nothing there is
shared, and what the target's prefix cache hashes are its own committed tokens only.

Drafts are the draft model's argmax: a point-mass proposal, for which the runner's "keep a
draft while the target's own draw equals it" is exact rejection sampling
(``engine/speculation.py``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from rillet.engine.block_manager import BlockManager
from rillet.engine.model_runner import ModelRunner
from rillet.engine.request import Request
from rillet.engine.scheduler import ScheduledRequest, SchedulerOutput
from rillet.engine.speculation import DraftTiming
from rillet.errors import ModelLoadError
from rillet.sampling import SamplingParams
from rillet.tokenizer import Tokenizer

_GREEDY = SamplingParams(max_new_tokens=None, temperature=0.0)
#: Forwards of at most this many tokens a row time what a draft costs the policy: catching
#: up after a rejection or a bonus token is. A prompt seen for the first time is not, nor is
#: a probe's catch-up after the policy paused (16+ tokens): counted, it made a paused draft
#: model look 1.8x a target step on Qwen2.5-Coder (bench/draft_cost.py), which kept it
#: paused; its cost is that of pausing, not of a draft.
_DECODE_LIKE = 8


class DraftModelProposer:
    """Fills the pending draft slots of a step's rows by running the draft model."""

    def __init__(
        self,
        runner: ModelRunner,
        block_manager: BlockManager,
        max_num_batched_tokens: int,
        target_vocab_size: int,
    ) -> None:
        """``runner`` holds the draft model and a KV cache of ``block_manager``'s blocks;
        ``target_vocab_size``: drafts at or past it (a draft model's padding rows) end a run,
        since the target could not embed them."""
        if block_manager.enable_prefix_caching:
            raise ValueError("the draft cache keeps no prefix cache")
        self.runner = runner
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.target_vocab_size = target_vocab_size
        #: Shadows in least recently drafted order (the first is evicted when blocks run out).
        self._shadows: OrderedDict[str, Request] = OrderedDict()
        self._step_shadows: list[Request] = []  # never evicted: they draft in this step
        self._num_committed: dict[str, int] = {}  # the target's tokens at each last sync
        #: Draft-model forwards run, their seconds, and shadows evicted for room (statistics).
        self.num_forwards = 0
        self.num_evictions = 0
        self.forward_seconds = 0.0
        # Since the last take_timing(): every forward's seconds, and the decode-like ones'.
        self._seconds = 0.0
        self._decode_forwards = 0
        self._decode_seconds = 0.0

    @property
    def num_used_blocks(self) -> int:
        return self.block_manager.num_used_blocks

    def take_timing(self) -> DraftTiming:
        """The draft model's time since the last call (the policy's measured cost)."""
        timing = DraftTiming(self._seconds, self._decode_forwards, self._decode_seconds)
        self._seconds, self._decode_forwards, self._decode_seconds = 0.0, 0, 0.0
        return timing

    def release(self, request_id: str) -> None:
        """Forget a finished request: its draft blocks go back."""
        shadow = self._shadows.pop(request_id, None)
        self._num_committed.pop(request_id, None)
        if shadow is not None:
            self.block_manager.free(shadow)
            self.runner.release(request_id)

    def propose(self, scheduled: list[ScheduledRequest]) -> None:
        """Fill every row's pending drafts (a row whose drafts cannot be made gets fewer)."""
        rows = [_Row(s, self._sync(s.request)) for s in scheduled if s.num_pending_drafts]
        if not rows:
            return
        self._step_shadows = [row.shadow for row in rows]
        self._catch_up(rows)
        live = [row for row in rows if self._wants_more(row)]
        while live:
            self._forward([(row, ScheduledRequest(row.shadow, 1, row.computed)) for row in live])
            live = [row for row in live if self._wants_more(row)]
        for row in rows:
            row.scheduled.fill_drafts(row.drafts)
        self._step_shadows = []

    # -- steps of propose -------------------------------------------------------------------

    def _sync(self, request: Request) -> Request:
        """The request's shadow, holding its committed tokens and only their valid KV."""
        rid = request.request_id
        shadow = self._shadows.pop(rid, None)
        if shadow is None:
            shadow = Request(rid, [], _GREEDY, time.monotonic(), max_new_tokens=0)
        self._shadows[rid] = shadow  # most recently drafted last
        # The shadow's tokens (and so its KV) are valid up to the first that differs from
        # the target's committed ones: drafts the target rejected, and what followed them.
        # all_token_ids is the shadow's whole record: it has no prompt/output split.
        # Its first tokens were the target's committed ones at the last sync, and those never
        # change: the comparison starts after them (not a scan of a long context each step).
        theirs, mine = request.all_token_ids, shadow.all_token_ids
        limit = min(len(theirs), len(mine))
        valid = min(self._num_committed.get(rid, 0), limit)
        while valid < limit and theirs[valid] == mine[valid]:
            valid += 1
        del mine[valid:]
        mine.extend(theirs[valid:])
        self._num_committed[rid] = len(theirs)
        # At least the last token runs again: its logits are draft 1's.
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, valid, len(theirs) - 1)
        self.block_manager.trim(shadow, shadow.num_computed_tokens)
        return shadow

    def _catch_up(self, rows: list[_Row]) -> None:
        """Forwards over each shadow's unseen tokens, at most a step's budget at a time,
        until each has sampled its first draft."""
        pending = list(rows)
        while pending:
            budget = self.max_num_batched_tokens
            batch: list[tuple[_Row, ScheduledRequest]] = []
            for row in pending:
                if budget == 0:
                    break
                n = min(row.shadow.num_tokens - row.computed, budget)
                if n <= 0 or not self._reserve(row.shadow, n):
                    row.stopped = True  # no room in the draft cache: this row goes without
                    continue
                batch.append((row, ScheduledRequest(row.shadow, n, row.computed)))
                budget -= n
            if not batch:
                break
            self._forward(batch)
            pending = [row for row in pending if not (row.stopped or row.drafts)]

    def _wants_more(self, row: _Row) -> bool:
        """Whether a row goes on to another forward: it has drafts, not all it wants, and
        its cache has room for one more token."""
        if row.stopped or not row.drafts or len(row.drafts) >= row.wanted:
            return False
        return self._reserve(row.shadow, 1)

    def _forward(self, batch: list[tuple[_Row, ScheduledRequest]]) -> None:
        """Run the draft model on ``batch``; each row that samples takes one more draft."""
        started = time.perf_counter()
        result = self.runner.execute(SchedulerOutput([s for _, s in batch], []))
        seconds = time.perf_counter() - started
        self.forward_seconds += seconds
        self.num_forwards += 1
        self._seconds += seconds
        if all(s.num_new_tokens <= _DECODE_LIKE for _, s in batch):
            self._decode_forwards += 1
            self._decode_seconds += seconds
        for row, s in batch:
            shadow = row.shadow
            shadow.num_computed_tokens += s.num_new_tokens
            if not s.samples:
                continue
            (token,) = result.sampled[shadow.request_id]
            if token >= self.target_vocab_size:
                row.stopped = True  # the target could not embed it: the run ends here
                continue
            row.drafts.append(token)
            shadow.all_token_ids.append(token)  # the next forward's input

    def _reserve(self, shadow: Request, num_tokens: int) -> bool:
        """Blocks for ``num_tokens`` more of ``shadow``'s tokens, evicting the least recently
        drafted shadows not drafting in this step when the cache is full."""
        bm = self.block_manager
        while not bm.can_allocate(shadow, num_tokens, []):
            busy = self._step_shadows
            victim = next(
                (sh for sh in self._shadows.values() if all(sh is not b for b in busy)), None
            )
            if victim is None:
                return False
            self.release(victim.request_id)
            self.num_evictions += 1
        bm.allocate(shadow, num_tokens, [])
        return True


@dataclass
class _Row:
    """One speculating row's drafting in this step."""

    scheduled: ScheduledRequest
    shadow: Request
    drafts: list[int] = field(default_factory=list)
    #: The run ended early (no room in the draft cache, or a token the target lacks).
    stopped: bool = False

    @property
    def wanted(self) -> int:
        return self.scheduled.num_pending_drafts

    @property
    def computed(self) -> int:
        return self.shadow.num_computed_tokens


def check_same_tokenizer(target: Tokenizer, draft: Tokenizer, draft_name: str) -> None:
    """Raise ModelLoadError, in one line, when ``draft`` would not encode and decode token
    ids as ``target`` does: its vocabulary (every token and id, added ones included) or the
    special tokens that matter (BOS, EOS, the control-token ids) differ."""
    mine, theirs = target.backend.get_vocab(True), draft.backend.get_vocab(True)
    problem = None
    if mine != theirs:
        differ = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda kv: kv[1])
        token, token_id = differ[0]
        problem = (
            f"vocabularies differ ({len(mine)} and {len(theirs)} tokens; "
            f"first difference: {token!r} at id {token_id})"
        )
    elif target.bos_token_id != draft.bos_token_id:
        problem = f"BOS ids differ ({target.bos_token_id} and {draft.bos_token_id})"
    elif target.eos_token_ids != draft.eos_token_ids:
        problem = (
            f"EOS ids differ ({sorted(target.eos_token_ids)} and {sorted(draft.eos_token_ids)})"
        )
    elif target.special_ids != draft.special_ids:
        problem = "their special (control) tokens differ"
    if problem is not None:
        raise ModelLoadError(
            f"draft model {draft_name!r} cannot draft for this model: its tokenizer differs "
            f"({problem})"
        )
