"""rillet.client picks a stream up by itself when its connection drops (a real TCP drop,
``tcp_proxy.py``, after 5 events), on rillet's HTTP app over a fake engine: sync and async,
TGI and chat streams, once per drop, and no resume where the server offers none."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest

from app_server import door
from polling import poll_until
from rillet.client import (
    APIConnectionError,
    AsyncClient,
    Client,
    IncompleteGenerationError,
    NotFoundError,
)
from tcp_proxy import DroppingProxy

pytestmark = pytest.mark.timeout(30)

CHAT = [{"role": "user", "content": "Hi"}]


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


async def test_sync_client_resumes_a_dropped_tgi_stream_and_loses_nothing() -> None:
    async with door() as d:
        with DroppingProxy(port_of(d.url), events=5) as proxy, Client(proxy.url) as client:
            items = await asyncio.to_thread(
                lambda: list(client.generate_stream("Hi", max_new_tokens=11))
            )
        assert proxy.dropped.is_set() and proxy.connections == 2
        assert "".join(i.token.text for i in items) == "Hello world"
        assert len(items) == 11
        assert items[-1].generated_text == "Hello world"
        await poll_until(lambda: d.service.in_flight == 0)


async def test_async_client_resumes_a_dropped_chat_stream() -> None:
    async with door() as d:
        with DroppingProxy(port_of(d.url), events=5) as proxy:
            async with AsyncClient(proxy.url) as client:
                chunks = [c async for c in client.chat(CHAT, stream=True, max_tokens=11)]
        assert proxy.connections == 2
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Hello world"


async def test_a_drop_without_resumable_streams_is_an_error_not_a_resume() -> None:
    async with door() as d:
        with DroppingProxy(port_of(d.url), events=5) as proxy:
            async with AsyncClient(proxy.url, resumable=False) as client:
                received: list[str] = []
                with pytest.raises((APIConnectionError, IncompleteGenerationError)):
                    async for item in client.generate_stream("Hi", max_new_tokens=11):
                        received.append(item.token.text)
        assert received == list("Hello")
        assert proxy.connections == 1


async def test_a_resume_that_finds_nothing_raises_the_servers_answer() -> None:
    async with door(resume_window_s=0.01) as d:
        d.engine.pause()  # the stream stays after event 1 until the window passes
        with DroppingProxy(port_of(d.url), events=1) as proxy:
            async with AsyncClient(proxy.url) as client:
                stream = client.generate_stream("Hi", max_new_tokens=11)
                first = await anext(stream)
                (request_id,) = d.engine.running
                await poll_until(lambda: request_id in d.engine.aborted)  # nobody came back
                with pytest.raises(NotFoundError) as refused:
                    await anext(stream)
        assert first.token.text == "H"
        assert refused.value.status_code == 404
