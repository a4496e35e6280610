"""The generation service on a fake engine: admission, draining, token limits, the chat
prompt, streaming and collecting with metrics, and the one cancellation path."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from fake_engine import FakeEngine
from polling import poll_until
from rillet.errors import (
    AuthenticationError,
    GenerationError,
    IncompleteGenerationError,
    OverloadedError,
    UnavailableError,
    ValidationError,
)
from rillet.protocol import FinishReason
from rillet.sampling import SamplingParams
from rillet.server.config import ServerConfig
from rillet.server.generation import Generation
from rillet.server.limits import FieldNames
from rillet.server.service import GenerationService
from rillet.server.spec import ChatPrompt, GenerationSpec

pytestmark = pytest.mark.timeout(20)


def make_service(**config: object) -> tuple[GenerationService, FakeEngine]:
    engine = FakeEngine(max_model_len=64)
    return GenerationService(engine, ServerConfig(**config)), engine  # type: ignore[arg-type]


class Plan:
    def __init__(self, spec: GenerationSpec) -> None:
        self.spec = spec


def plan_of(prompt: str = "Hi", max_new_tokens: int | None = 5) -> Plan:
    return Plan(GenerationSpec(prompt, SamplingParams(max_new_tokens=max_new_tokens)))


def requests_total(service: GenerationService, route: str, outcome: str) -> float:
    value = service.metrics.registry.get_sample_value(
        "rillet_requests_total", {"route": route, "outcome": outcome}
    )
    return value or 0.0


async def test_one_count_refuses_at_once_past_the_limit_and_frees_when_the_run_ends() -> None:
    service, _ = make_service(max_concurrent_requests=2)
    first, second = service.admit("a"), service.admit("b")
    with pytest.raises(OverloadedError):
        service.admit("c")
    assert service.in_flight == 2 and requests_total(service, "c", "overloaded") == 1
    await first.run(asyncio.sleep(0))
    assert service.in_flight == 1
    with pytest.raises(RuntimeError, match="runs once"):
        first.run(asyncio.sleep(0))
    await service.admit("c").run(asyncio.sleep(0))
    await second.run(asyncio.sleep(0))
    assert service.in_flight == 0
    assert sum(requests_total(service, r, "cancelled") for r in "abc") == 3  # once each


async def test_a_run_cancelled_before_its_first_step_returns_the_permit() -> None:
    service, engine = make_service(max_concurrent_requests=1)
    generation, _ = service.start("ws", lambda: plan_of("Hi", 5))
    task = generation.run(generation.collect())
    task.cancel()  # before the task ran a step: its body, and any finally in it, never run
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)  # the done callbacks run on the loop's next turn
    assert service.in_flight == 0 and engine.requests == []
    assert requests_total(service, "ws", "cancelled") == 1


async def test_draining_refuses_with_unavailable() -> None:
    service, _ = make_service()
    service.draining = True
    with pytest.raises(UnavailableError) as refused:
        service.admit("generate")
    assert refused.value.http_status == 503 and refused.value.grpc_code == "UNAVAILABLE"
    assert not service.is_ready


async def test_a_plan_that_fails_returns_its_permit_and_records_the_outcome() -> None:
    service, _ = make_service(max_concurrent_requests=1)

    def bad_plan() -> Plan:
        raise ValidationError("no")

    with pytest.raises(ValidationError):
        service.start("generate", bad_plan)
    assert service.in_flight == 0 and requests_total(service, "generate", "validation") == 1
    with pytest.raises(ValidationError, match="`inputs` cannot be empty"):
        service.start("generate", lambda: plan_of(""))
    assert service.in_flight == 0


async def test_limits_one_check_in_the_clients_own_words() -> None:
    service, _ = make_service(max_input_tokens=10, max_total_tokens=20)
    names = FieldNames(prompt="prompt", max_new_tokens="max_tokens")
    too_long = GenerationSpec("x" * 11, SamplingParams(max_new_tokens=1), names=names)
    with pytest.raises(
        ValidationError, match=r"^`prompt` must have less than 10 tokens\. Given: 11$"
    ):
        service.build_request(too_long)
    over = GenerationSpec("x" * 10, SamplingParams(max_new_tokens=11), names=names)
    with pytest.raises(ValidationError, match=r"`prompt` tokens \+ `max_tokens` must be <= 20"):
        service.build_request(over)
    zero = GenerationSpec("x", SamplingParams(max_new_tokens=0), names=names)
    with pytest.raises(ValidationError, match="`max_tokens` must be strictly positive"):
        service.build_request(zero)
    # No cap: the room left in the context.
    request = service.build_request(GenerationSpec("x" * 4, SamplingParams(max_new_tokens=None)))
    assert request.params.max_new_tokens == 16


async def test_truncate_keeps_the_last_prompt_tokens() -> None:
    service, engine = make_service(max_input_tokens=10)
    spec = GenerationSpec("abcdefghijklmnop", SamplingParams(max_new_tokens=2), truncate=3)
    request = service.build_request(spec)
    assert engine.tokenizer.decode(request.prompt_token_ids) == "nop"
    with pytest.raises(ValidationError, match="`truncate` must be strictly positive"):
        service.build_request(GenerationSpec("abc", SamplingParams(), truncate=11))


async def test_chat_prompt_renders_the_template_and_can_drop_the_oldest_turns() -> None:
    service, engine = make_service(max_input_tokens=60)
    system = {"role": "system", "content": "S"}
    turns = [
        {"role": "user", "content": "first question " * 2},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "now?"},
    ]
    params = SamplingParams(max_new_tokens=2)
    kept = service.build_request(
        GenerationSpec(ChatPrompt([system, *turns], drop_oldest_turns=True), params)
    )
    text = engine.tokenizer.decode(kept.prompt_token_ids, skip_special_tokens=False)
    # The oldest user/assistant pair went; the system message and the last turn stayed.
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nnow?<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )
    with pytest.raises(ValidationError, match="`inputs` must have less than 60 tokens"):
        service.build_request(GenerationSpec(ChatPrompt([system, *turns]), params))


#: Every refusal of ``build_request``, byte for byte as clients have always seen it; where a
#: request breaks two rules, the first check in the service's order speaks.
REFUSALS = [
    (GenerationSpec("Hi", SamplingParams(stop=list("abcde"))),
     "`stop` supports up to 4 stop sequences. Given: 5"),
    (GenerationSpec("Hi", SamplingParams(stop=["x" * 513])),
     "a stop sequence may have at most 512 characters. Given: 513"),
    (GenerationSpec(ChatPrompt([{"role": "user", "content": "x"}] * 1025), SamplingParams()),
     "`messages` may hold at most 1024 messages. Given: 1025"),
    (GenerationSpec("", SamplingParams(max_new_tokens=0), names=FieldNames("prompt", "max_tokens")),
     "`max_tokens` must be strictly positive"),
    (GenerationSpec("", SamplingParams(top_p=0.0)), "`inputs` cannot be empty"),
    (GenerationSpec([], SamplingParams(), names=FieldNames("prompt")), "`prompt` cannot be empty"),
    (GenerationSpec("abc", SamplingParams(), truncate=0),
     "`truncate` must be strictly positive and less than 63. Given: 0"),
    (GenerationSpec([999] * 64, SamplingParams(top_p=0.0)),
     "`inputs` must have less than 63 tokens. Given: 64"),
    (GenerationSpec("x" * 60, SamplingParams(max_new_tokens=5)),
     "`inputs` tokens + `max_new_tokens` must be <= 64. Given: 60 `inputs` tokens and 5 "
     "`max_new_tokens`"),
    (GenerationSpec([999], SamplingParams(top_p=0.0)), "`top_p` must be > 0.0 and <= 1.0"),
    (GenerationSpec("Hi", SamplingParams(max_new_tokens=None, min_tokens=63)),
     "`min_tokens` must be <= `max_new_tokens`"),
    (GenerationSpec([5, 999], SamplingParams()), "prompt token ids must be integers in [0, 101)"),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "message"), REFUSALS)
async def test_the_service_refuses_in_the_words_clients_know(
    spec: GenerationSpec, message: str
) -> None:
    service, engine = make_service()
    assert engine.vocab_size == 101 and engine.max_model_len == 64
    with pytest.raises(ValidationError) as refused:
        service.build_request(spec)
    assert refused.value.message == message
    assert refused.value.http_status == 422


async def test_build_request_carries_new_params_and_leaves_the_spec_alone() -> None:
    service, engine = make_service(default_temperature=0.5)
    params = SamplingParams(max_new_tokens=None, temperature=1.0)
    spec = GenerationSpec("abcd", params, unset=frozenset({"temperature"}))
    request = service.build_request(spec)
    assert request.prompt_token_ids == engine.tokenizer.encode("abcd")
    assert request.params.max_new_tokens == 60 and request.params.temperature == 0.5
    assert spec.params is params  # the dialect's spec and params are as it made them
    assert params.max_new_tokens is None and params.temperature == 1.0


async def test_the_engine_guard_is_not_what_a_client_meets() -> None:
    # A prompt as long as the whole context: the service's limit speaks, not the engine's
    # neutral guard (which would name max_model_len).
    service, _ = make_service()
    with pytest.raises(ValidationError) as refused:
        service.build_request(GenerationSpec("x" * 64, SamplingParams()))
    assert refused.value.message == "`inputs` must have less than 63 tokens. Given: 64"


async def test_stream_and_collect_record_metrics_once() -> None:
    service, engine = make_service()
    generation, _ = service.start("generate", lambda: plan_of("Hi", 5))
    result = await generation.run(generation.collect())
    assert result.text == "Hello" and result.finish_reason is FinishReason.LENGTH
    assert [t.text for t in result.tokens] == list("Hello")
    assert result.num_generated_tokens == 5 and generation.outcome == "success"
    metrics = service.metrics.registry
    assert metrics.get_sample_value("rillet_generated_tokens_total") == 5
    assert requests_total(service, "generate", "success") == 1
    assert engine.finished == [generation.request.request_id]  # type: ignore[union-attr]


async def test_cancelling_the_consumer_aborts_the_engine_request() -> None:
    service, engine = make_service()
    engine.pause()
    generation, _ = service.start("ws", lambda: plan_of("Hi", 5))
    received: list[str] = []

    async def consume() -> None:
        async with contextlib.aclosing(generation.stream()) as outputs:
            async for out in outputs:
                received.append(out.text)

    task = generation.run(consume())
    await engine.wait_running(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert received == ["H"]
    assert engine.aborted == [generation.request.request_id]  # type: ignore[union-attr]
    assert not engine.running and service.in_flight == 0
    assert requests_total(service, "ws", "cancelled") == 1


async def test_engine_errors_reach_the_consumer_and_the_outcome() -> None:
    service, engine = make_service()
    engine.fail_after = (2, GenerationError("boom"))
    generation, _ = service.start("generate", lambda: plan_of("Hi", 5))
    with pytest.raises(GenerationError, match="boom"):
        await generation.run(generation.collect())
    assert requests_total(service, "generate", "generation") == 1


async def test_drain_lets_requests_finish_then_ends_the_rest() -> None:
    service, engine = make_service()
    engine.pause()
    quick, _ = service.start("a", lambda: plan_of("Hi", 3))
    slow, _ = service.start("b", lambda: plan_of("Hi", 5))
    results: dict[str, object] = {}

    async def run(name: str, generation: Generation) -> None:
        try:
            results[name] = (await generation.collect()).text
        except IncompleteGenerationError as exc:
            results[name] = exc

    tasks = [quick.run(run("quick", quick)), slow.run(run("slow", slow))]
    await engine.wait_running(2)
    done = asyncio.Event()
    # The drain may end early only when nothing is in flight; "slow" never gets there alone.
    drain = asyncio.ensure_future(service.drain(grace_s=60, give_up=done.is_set))
    await asyncio.sleep(0)
    with pytest.raises(UnavailableError):
        service.admit("c")
    await engine.step()
    await engine.step()  # "quick" has its 3 tokens now; "slow" has 3 of 5
    await poll_until(lambda: "quick" in results)
    assert results["quick"] == "Hel" and service.in_flight == 1
    done.set()  # grace is over: the engine shuts down and "slow" ends in error
    await drain
    await asyncio.gather(*tasks)
    assert isinstance(results["slow"], IncompleteGenerationError)
    assert service.in_flight == 0 and not service.is_ready


def test_the_key_is_checked_in_one_place() -> None:
    service, _ = make_service(api_key="s3cret")
    service.check_key("s3cret")
    for wrong in (None, "", "s3cre", "s3cret ", "S3CRET"):
        with pytest.raises(AuthenticationError):
            service.check_key(wrong)
    open_service, _ = make_service()
    open_service.check_key(None)


async def test_outputs_read_outside_a_run_are_refused() -> None:
    """A door that forgot ``run`` would never return the permit: it fails at once instead."""
    service, engine = make_service()
    generation, _ = service.start("generate", lambda: plan_of("Hi", 5))
    with pytest.raises(RuntimeError, match=r"inside Generation\.run"):
        await generation.collect()
    assert engine.requests == []
    await generation.run(generation.collect())
    assert service.in_flight == 0
