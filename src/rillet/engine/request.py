"""Per-request state inside the engine core: token ids, progress, block table, status.

A :class:`Request` is owned by the scheduler. Its progress is one number,
``num_computed_tokens`` (tokens whose KV is in the cache), compared with ``num_tokens``
(prompt + output): the gap is what still has to run through the model, whether that gap
is a prompt, the rest of a chunked prompt, a recompute after preemption, or one decode token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from rillet.protocol import EngineRequest, FinishReason
from rillet.sampling import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is: queued (or preempted back to the queue), in the batch, or done."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False, slots=True)
class Request:
    """One generation request as the core tracks it (token ids only, no text).

    ``max_new_tokens`` is already resolved by the engine (never None). ``all_token_ids`` is
    prompt + output and is kept in sync by :meth:`append_token`; never append to the lists
    directly. ``block_hashes`` and ``num_registered_blocks`` belong to the block manager.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    max_new_tokens: int
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(init=False)
    #: Tokens whose KV is in the cache, prefix-cache hits included.
    num_computed_tokens: int = 0
    #: Prefix-cache hit tokens found when the request was first scheduled (a statistic).
    num_cached_tokens: int = 0
    #: The block table: block ``i`` holds the KV of tokens ``[i * block_size, (i+1) * block_size)``.
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    #: time.monotonic() when first scheduled (the end of its queue time)
    first_scheduled_time: float | None = None
    #: Chained hashes of this request's full blocks. They depend on token ids only, so they
    #: survive preemption and are computed at most once per block.
    block_hashes: list[bytes] = field(default_factory=list)
    #: How many leading entries of ``block_ids`` are already registered in the prefix cache.
    num_registered_blocks: int = 0
    #: Output tokens the last step appended (more than one when it accepted draft tokens).
    num_step_tokens: int = 0

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.all_token_ids = [*self.prompt_token_ids, *self.output_token_ids]

    @classmethod
    def from_engine_request(cls, request: EngineRequest, max_new_tokens: int) -> Request:
        """Build the core's state for a validated request; the caller resolves the token cap."""
        return cls(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            params=request.params,
            arrival_time=request.arrival_time,
            max_new_tokens=max_new_tokens,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Record one sampled token (its KV is computed by the next step that schedules it)."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
