"""CoreLoop on a real core (a tiny random-weight Llama, float32) with scripted commands: a
forward that raises fails exactly the requests it ran, frees their blocks, and the loop
serves on: a request that was waiting meanwhile, and one that comes after, finish with the
same tokens as in a run without the fault."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rillet.config import EngineConfig
from rillet.engine.builder import EngineParts, build_engine
from rillet.engine.core_loop import Command, CoreLoop
from rillet.engine.inputs import build_request
from rillet.errors import GenerationError, RilletError
from rillet.protocol import EngineRequest, TokenDelta
from rillet.sampling import SamplingParams

pytestmark = pytest.mark.slow


class Recorder:
    """The loop's reports: tokens and errors per request."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.finished: set[str] = set()
        self.errors: dict[str, RilletError] = {}

    def step(self, deltas: list[TokenDelta]) -> list[str]:
        for delta in deltas:
            self.tokens.setdefault(delta.request_id, []).extend(delta.new_token_ids)
            if delta.finish_reason is not None:
                self.finished.add(delta.request_id)
        return []

    def errors_(self, failed: list[tuple[str, RilletError]]) -> None:
        self.errors.update(failed)


def run_script(parts: EngineParts, first: list[EngineRequest], then: EngineRequest) -> Recorder:
    """Add ``first`` together, run until idle, add ``then``, run until idle, stop."""
    recorder = Recorder()
    batches: Iterator[list[Command]] = iter(
        [[("add", request) for request in first], [("add", then)], [("stop", None)]]
    )

    def receive(timeout: float) -> list[Command]:
        return [] if parts.core.has_unfinished_requests() else next(batches)

    reporter = type("R", (), {"step": recorder.step, "errors": recorder.errors_})()
    CoreLoop(parts.core, receive, reporter).run()
    return recorder


def requests(parts: EngineParts) -> list[EngineRequest]:
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    return [
        build_request(
            parts.tokenizer,
            parts.model_config.vocab_size,
            parts.max_model_len,
            prompt,
            params,
            request_id=name,
        )
        for name, prompt in (("a", "one two"), ("b", "three four"), ("c", "five"), ("d", "six"))
    ]


def engine(tiny_model_dir: Path, fault: int | None) -> EngineParts:
    # Two requests at a time: "c" waits while "a" and "b" run.
    config = EngineConfig(
        model=str(tiny_model_dir),
        dtype="float32",
        num_kv_blocks=64,
        max_num_seqs=2,
        fail_forward_at_batch_size=fault,
    )
    return build_engine(config)


def test_a_failed_forward_fails_only_its_requests(tiny_model_dir: Path) -> None:
    clean = engine(tiny_model_dir, fault=None)
    a, b, c, d = requests(clean)
    reference = run_script(clean, [a, b, c], d)
    assert reference.finished == {"a", "b", "c", "d"} and not reference.errors

    faulty = engine(tiny_model_dir, fault=2)  # the first step that runs 2 requests raises
    a, b, c, d = requests(faulty)
    seen = run_script(faulty, [a, b, c], d)
    assert set(seen.errors) == {"a", "b"}
    for error in seen.errors.values():
        assert isinstance(error, GenerationError) and "fault injected" in error.message
    assert "a" not in seen.tokens and "b" not in seen.tokens  # no token before the fault
    assert seen.finished == {"c", "d"}
    assert (seen.tokens["c"], seen.tokens["d"]) == (reference.tokens["c"], reference.tokens["d"])
    assert faulty.core.scheduler.block_manager.num_used_blocks == 0
    assert not faulty.core.has_unfinished_requests()
