"""The HTTP doors over the generation service, on a fake engine the test holds: real uvicorn on
loopback and real clients, no model. Admission (429 on every route, the same count), draining
(503, then in-band errors), the limits' messages per door, disconnects, and tokens reaching
``curl -N`` one at a time. Holding a request is explicit (``FakeEngine.pause``), so nothing
here races a fast engine."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.errors import OverloadedError as HubOverloadedError

from app_server import door, held_stream
from polling import poll_until
from rillet.client import AsyncClient, AuthenticationError, OverloadedError, Response
from rillet.client.errors import IncompleteGenerationError as ClientIncomplete
from rillet.server.sampling_defaults import MODEL_SOURCE

pytestmark = pytest.mark.timeout(30)

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
    ("/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
    ("/", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}, "stream": True}),
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "stream": True}),
]


async def test_overload_is_429_on_every_route_then_capacity_comes_back() -> None:
    async with door(max_concurrent_requests=1) as d:
        async with held_stream(d):
            for route, body in REQUESTS:
                response = await d.http.post(route, json=body)
                assert response.status_code == 429, (route, response.text)
                assert response.headers["retry-after"] == "1"
                if route.startswith("/v1/"):
                    error = response.json()["error"]
                    assert error["message"] == "Model is overloaded" and error["code"] == 429
                    assert error["type"] == "overloaded"
                else:
                    assert response.json() == {
                        "error": "Model is overloaded",
                        "error_type": "overloaded",
                    }
            assert (await d.http.post("/?prompt=Hi")).status_code == 429
            sdk = openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="k", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                await sdk.completions.create(model="m", prompt="Hi", max_tokens=2)
            async with AsyncInferenceClient(d.url) as hub:
                with pytest.raises(HubOverloadedError):
                    await hub.text_generation("Hi", max_new_tokens=2)
            async with AsyncClient(d.url) as ours:
                with pytest.raises(OverloadedError) as refused:
                    await ours.generate("Hi", max_new_tokens=2)
                assert refused.value.status_code == 429 and refused.value.retry_after == 1
            assert d.service.in_flight == 1
        await poll_until(lambda: d.service.in_flight == 0)
        for route, body in REQUESTS:
            assert (await d.http.post(route, json=body)).status_code == 200, route


async def test_a_retrying_client_gets_the_slot_once_it_frees() -> None:
    async with (
        door(max_concurrent_requests=1) as d,
        held_stream(d),
        AsyncClient(d.url, max_retries=30) as patient,
    ):
        attempt = asyncio.ensure_future(patient.generate("Hi", max_new_tokens=2))
        refused = {"route": "generate", "outcome": "overloaded"}
        registry = d.service.metrics.registry
        await poll_until(lambda: registry.get_sample_value("rillet_requests_total", refused))
        d.engine.resume()  # the held stream finishes and frees the slot
        result = await attempt
    assert isinstance(result, Response) and result.generated_text == "He"


async def test_generation_routes_need_the_key_and_info_routes_stay_open() -> None:
    async with door(api_key="test-key") as d:
        for route, body in REQUESTS:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"}):
                response = await d.http.post(route, json=body, headers=headers)
                assert response.status_code == 401, (route, headers)
                error = response.json()
                kind = error["error"]["type"] if route.startswith("/v1/") else error["error_type"]
                assert kind == "authentication"
        assert (await d.http.post("/tokenize", json={"inputs": "Hi"})).status_code == 401
        assert (await d.http.post("/?prompt=Hi")).status_code == 401
        for path in ("/health", "/info", "/metrics", "/v1/models"):
            assert (await d.http.get(path)).status_code == 200, path
        lower = {"authorization": "bearer test-key"}
        assert (await d.http.post("/generate", json=REQUESTS[0][1], headers=lower)).is_success
        wrong = openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="wrong", max_retries=0)
        assert (await wrong.models.list()).data  # open, as in TGI
        with pytest.raises(openai.AuthenticationError):
            await wrong.completions.create(model="m", prompt="Hi", max_tokens=2)
        async with AsyncClient(d.url, "wrong") as ours:
            with pytest.raises(AuthenticationError) as refused:
                await ours.generate("Hi", max_new_tokens=2)
        assert refused.value.status_code == 401
        assert len(d.engine.requests) == 1  # only the one with the key reached the engine


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences"),
        ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"max_new_tokens": 9000}, "`max_new_tokens` must be <="),
        ({"best_of": 2}, "`best_of`"),
        ({"temperature": -1}, "`temperature`"),
        ({"top_p": 1.5}, "`top_p`"),
        ({"truncate": 0}, "`truncate`"),
    ],
)
async def test_invalid_tgi_parameters_are_422_validation(
    parameters: dict[str, Any], message: str
) -> None:
    async with door() as d:
        for path in ("/generate", "/generate_stream", "/"):
            body = {"inputs": "Hi", "parameters": parameters}
            response = await d.http.post(path, json=body)
            assert response.status_code == 422, response.text
            error = response.json()
            assert error["error_type"] == "validation"
            assert error["error"].startswith("Input validation error: ")
            assert message in error["error"]
        assert d.service.in_flight == 0 and not d.engine.requests


async def test_draining_lets_streams_finish_refuses_new_work_then_ends_the_rest() -> None:
    async with door(max_concurrent_requests=4) as d:
        d.engine.pause()
        tgi_body = {"inputs": "Hi", "parameters": {"max_new_tokens": 5}}
        chat_body = {**CHAT, "max_tokens": 5, "stream": True}
        short_body = {"prompt": "Hi", "max_tokens": 2, "stream": True}
        async with (
            d.http.stream("POST", "/generate_stream", json=tgi_body) as tgi,
            d.http.stream("POST", "/v1/chat/completions", json=chat_body) as chat,
            d.http.stream("POST", "/v1/completions", json=short_body) as short,
        ):
            await d.engine.wait_running(3)
            grace_over = asyncio.Event()
            drain = asyncio.ensure_future(d.service.drain(grace_s=60, give_up=grace_over.is_set))
            await poll_until(lambda: d.service.draining)
            for route, body in REQUESTS:
                response = await d.http.post(route, json=body)
                assert response.status_code == 503, route
                assert response.json()["error" if route.startswith("/v1/") else "error_type"]
            assert (await d.http.get("/health")).status_code == 503
            await d.engine.step()  # the short completion gets its second and last token
            short_events = [line async for line in short.aiter_lines() if line.startswith("data:")]
            assert short_events[-1] == "data: [DONE]"
            finish = json.loads(short_events[-2].removeprefix("data: "))["choices"][0]
            assert finish["finish_reason"] == "length"
            grace_over.set()
            await drain
            tgi_events = [line async for line in tgi.aiter_lines() if line.startswith("data:")]
            chat_events = [line async for line in chat.aiter_lines() if line.startswith("data:")]
        last_tgi = json.loads(tgi_events[-1].removeprefix("data: "))
        assert last_tgi["error_type"] == "incomplete_generation"
        assert chat_events[-1] == "data: [DONE]"
        error = json.loads(chat_events[-2].removeprefix("data: "))["error"]
        assert error["type"] == "incomplete_generation" and error["code"] == 500
        await poll_until(lambda: d.service.in_flight == 0)


async def test_rillet_client_raises_an_in_band_error_mid_stream() -> None:
    async with door() as d, AsyncClient(d.url) as client:
        d.engine.pause()
        tgi = client.generate_stream("Hi", max_new_tokens=5)
        chat = client.chat([{"role": "user", "content": "Hi"}], stream=True, max_tokens=5)
        assert (await anext(tgi)).token.text == "H"
        assert (await anext(chat)).choices
        await d.engine.wait_running(2)
        await d.service.drain(grace_s=0)
        for stream in (tgi, chat):
            with pytest.raises(ClientIncomplete) as info:
                async for _ in stream:
                    pass
            assert info.value.status_code is None  # it came in-band, after HTTP 200


async def test_limits_speak_each_doors_words() -> None:
    async with door(max_input_tokens=8, max_total_tokens=12) as d:
        tgi = await d.http.post(
            "/generate", json={"inputs": "x" * 9, "parameters": {"max_new_tokens": 1}}
        )
        assert tgi.status_code == 422
        assert tgi.json() == {
            "error": "Input validation error: `inputs` must have less than 8 tokens. Given: 9",
            "error_type": "validation",
        }
        completion = await d.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 12})
        assert completion.status_code == 400
        assert completion.json()["error"]["message"] == (
            "`prompt` tokens + `max_tokens` must be <= 12. Given: 1 `prompt` tokens and 12 "
            "`max_tokens`"
        )
        plain = await d.http.post("/?prompt=" + "x" * 9)
        assert plain.status_code == 422 and "`prompt` must have less than 8" in plain.text
        assert d.service.in_flight == 0


async def test_a_disconnect_aborts_the_engine_request_and_frees_the_slot() -> None:
    async with door() as d:
        d.engine.pause()
        body = {"prompt": "Hi", "max_tokens": 5, "stream": True}
        async with d.http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            await d.engine.wait_running(1)
        await poll_until(lambda: not d.engine.running and not d.service.in_flight)
        assert len(d.engine.aborted) == 1 and not d.engine.finished
        cancelled = {"route": "completions", "outcome": "cancelled"}
        assert d.service.metrics.registry.get_sample_value("rillet_requests_total", cancelled) == 1


async def test_curl_receives_each_token_as_it_is_generated() -> None:
    """Each event reaches ``curl -N`` before the engine produces the next token."""
    async with door() as d:
        d.engine.pause()
        body = json.dumps({"inputs": "Hi", "parameters": {"max_new_tokens": 5}})
        curl = await asyncio.create_subprocess_exec(
            *("curl", "-N", "-sS", f"{d.url}/generate_stream", "-d", body),
            stdout=asyncio.subprocess.PIPE,
        )
        assert curl.stdout is not None
        received = b""
        for count in range(1, 6):
            while received.count(b"data: ") < count:
                chunk = await curl.stdout.read(65536)
                assert chunk, "curl's stream ended early"
                received += chunk
            assert received.count(b"data: ") == count  # not one more: the engine is held
            if count < 5:
                await d.engine.step()
        received += await curl.stdout.read()  # to the end of the body
        assert await curl.wait() == 0
        texts = [json.loads(e)["token"]["text"] for e in received.split(b"data: ")[1:]]
        assert texts == list("Hello")


async def test_unset_sampling_fields_get_the_flag_then_the_models_default() -> None:
    model = {"temperature": 0.6, "top_p": 0.9}
    async with door(generation_defaults=model, default_top_p=0.8) as d:
        info = (await d.http.get("/info")).json()
        assert info["sampling_defaults"] == {
            "temperature": {"value": 0.6, "source": MODEL_SOURCE},
            "top_p": {"value": 0.8, "source": "--default-top-p"},
        }
        sdk = openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="k", max_retries=0)
        await sdk.chat.completions.create(model="m", messages=CHAT["messages"], max_tokens=2)
        await sdk.completions.create(model="m", prompt="Hi", max_tokens=2, temperature=1.3)
        async with AsyncInferenceClient(d.url) as hub:
            await hub.text_generation("Hi", max_new_tokens=2)  # greedy: TGI's own default
            await hub.text_generation("Hi", max_new_tokens=2, do_sample=True, top_p=0.5)
        seen = [(r.params.temperature, r.params.top_p) for r in d.engine.requests]
        assert seen == [(0.6, 0.8), (1.3, 0.8), (0.0, 1.0), (0.6, 0.5)]


async def test_bad_or_oversized_grammars_are_4xx_in_each_doors_shape() -> None:
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(20)}}
    bad_tgi = [
        ({"type": "regex", "value": "(abc"}, "invalid regex: Regex parsing error"),
        ({"type": "json", "value": {"type": "strin"}}, 'Unsupported type "strin"'),
        ({"type": "json", "value": big}, "at most 100 characters. Given: 5"),
    ]
    async with door(max_grammar_length=100) as d:
        for grammar, message in bad_tgi:
            for path in ("/generate", "/generate_stream"):
                body = {"inputs": "Hi", "parameters": {"grammar": grammar}}
                response = await d.http.post(path, json=body)
                assert response.status_code == 422, response.text
                error = response.json()
                assert error["error_type"] == "validation"
                assert error["error"].startswith("Input validation error: ")
                assert message in error["error"]
        for path, body in (
            ("/v1/chat/completions", dict(CHAT)),
            ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "stream": True}),
        ):
            body["response_format"] = {"type": "json_schema", "json_schema": {"schema": big}}
            response = await d.http.post(path, json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert "at most 100 characters" in error["message"]
            assert error["type"] == "validation"
        assert d.service.in_flight == 0 and not d.engine.requests
