"""``Client`` and ``AsyncClient``: thin httpx shells over the shared core in ``_core``.

Each method builds a :class:`~rillet.client._core.Call`, moves bytes, and hands them back to
the core; the two classes differ only in ``await``. Streaming methods return generators: the
request is sent on the first ``next()``, and closing the generator early (``break``,
``.close()``, Ctrl-C) closes the connection, which makes the server abort the generation.
(CPython closes a sync generator as soon as a ``break`` drops it; an async generator left
by ``break`` is closed later by the event loop, so wrap it in ``contextlib.aclosing`` when
the abort must happen at once.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Coroutine, Generator, Mapping
from typing import Any, Literal, TypeVar, Unpack, overload

import httpx

from rillet.client import _core
from rillet.client._core import DEFAULT_TIMEOUT, Call, Messages
from rillet.client.errors import ClientError, OverloadedError
from rillet.client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatParameters,
    GenerateParameters,
    Response,
    StreamResponse,
)

T = TypeVar("T")


class _Base:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        headers: Mapping[str, str] | None,
        max_retries: int,
        resumable: bool,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = _core.request_headers(api_key, headers)
        self._stream_headers = {**self._headers, **(_core.RESUMABLE_HEADERS if resumable else {})}
        self._retry = _core.RetryPolicy(max_retries=max_retries)

    def _url(self, call: Call[Any]) -> str:
        return self.base_url + call.path

    def _resume_request(self, resume: _core.Resume) -> tuple[str, str, None, dict[str, str]]:
        return "GET", self.base_url + resume.path, None, {**self._headers, **resume.headers}


class Client(_Base):
    """Blocking client for a rillet (or TGI) server.

    >>> client = Client("http://127.0.0.1:8080")
    >>> client.generate("Why is the sky blue?", max_new_tokens=16).generated_text
    >>> for response in client.generate_stream("Why is the sky blue?"):
    ...     if not response.token.special:
    ...         print(response.token.text, end="", flush=True)

    ``timeout`` is per network operation (connect, each read), so a long stream never times
    out while tokens keep coming. ``max_retries`` retries requests refused as overloaded
    (429), honouring ``retry-after``; off by default. ``http_client`` lets you bring your own
    ``httpx.Client`` (proxies, TLS); it is then yours to close.

    With ``resumable`` (the default), streams survive a dropped connection: rillet keeps a
    stream's events for a while (``--resume-window``), and the client asks for the ones after
    the last it read (``GET /streams/<id>``), once per drop, without repeating or losing a
    token. Servers that do not offer it (TGI) ignore the request header.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        max_retries: int = 0,
        resumable: bool = True,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(base_url, api_key, headers, max_retries, resumable)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)

    def generate(self, prompt: str, **parameters: Unpack[GenerateParameters]) -> Response:
        """Generate a completion of ``prompt`` and return it whole (``POST /generate``)."""
        return self._request(_core.generate_call(prompt, parameters))

    def generate_stream(
        self, prompt: str, **parameters: Unpack[GenerateParameters]
    ) -> Generator[StreamResponse, None, None]:
        """Yield one :class:`StreamResponse` per generated token (``POST /generate_stream``)."""
        return self._stream(_core.generate_stream_call(prompt, parameters))

    @overload
    def chat(
        self, messages: Messages, stream: Literal[False] = False, **params: Unpack[ChatParameters]
    ) -> ChatCompletion: ...
    @overload
    def chat(
        self, messages: Messages, stream: Literal[True], **params: Unpack[ChatParameters]
    ) -> Generator[ChatCompletionChunk, None, None]: ...
    def chat(
        self, messages: Messages, stream: bool = False, **params: Unpack[ChatParameters]
    ) -> ChatCompletion | Generator[ChatCompletionChunk, None, None]:
        """Chat on the OpenAI route; the server applies the model's chat template.

        ``messages`` are dicts or :class:`ChatMessage`. With ``stream=True``, yields typed
        chunks until the server's ``[DONE]``.
        """
        if stream:
            return self._stream(_core.chat_stream_call(messages, params))
        return self._request(_core.chat_call(messages, params))

    def close(self) -> None:
        """Close the connection pool (only if this client created it)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            with _core.transport_errors():
                response = self._http.post(self._url(call), json=call.body, headers=self._headers)
            try:
                return _core.read_response(
                    call, response.status_code, response.headers, response.content
                )
            except ClientError as error:
                delay = self._retry.delay(attempt, error)
                if delay is None:
                    raise
            time.sleep(delay)
            attempt += 1

    def _stream(self, call: Call[T]) -> Generator[T, None, None]:
        attempt = 0
        while True:
            reader = _core.StreamReader(call)
            try:
                yield from self._follow(
                    reader, "POST", self._url(call), call.body, self._stream_headers
                )
                return
            except OverloadedError as error:
                # Retrying is safe only before the first token reached the caller.
                delay = None if reader.started else self._retry.delay(attempt, error)
                if delay is None:
                    raise
            time.sleep(delay)
            attempt += 1

    def _follow(
        self,
        reader: _core.StreamReader[T],
        method: str,
        url: str,
        body: Any,
        headers: Mapping[str, str],
    ) -> Generator[T, None, None]:
        """The stream's items; after a dropped connection, its resume's."""
        while True:
            try:
                with (
                    _core.transport_errors(),
                    self._http.stream(method, url, json=body, headers=headers) as response,
                ):
                    status, response_headers = response.status_code, response.headers
                    if not _core.is_event_stream(status, response_headers):
                        raise _core.error_from_non_stream(status, response_headers, response.read())
                    reader.connected(response_headers)
                    for chunk in response.iter_bytes():
                        yield from reader.feed(chunk)
                reader.end()
                return
            except ClientError as error:
                resume = reader.resume_after(error)
                if resume is None:
                    raise
                method, url, body, headers = self._resume_request(resume)


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client`, with the same arguments and results.

    >>> client = AsyncClient("http://127.0.0.1:8080")
    >>> (await client.generate("Why is the sky blue?")).generated_text
    >>> async for response in client.generate_stream("Why is the sky blue?"):
    ...     print(response.token.text, end="")
    >>> async for chunk in client.chat([{"role": "user", "content": "Hi"}], stream=True):
    ...     print(chunk.choices[0].delta.content or "", end="")
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        max_retries: int = 0,
        resumable: bool = True,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, api_key, headers, max_retries, resumable)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)

    async def generate(self, prompt: str, **parameters: Unpack[GenerateParameters]) -> Response:
        """Generate a completion of ``prompt`` and return it whole (``POST /generate``)."""
        return await self._request(_core.generate_call(prompt, parameters))

    def generate_stream(
        self, prompt: str, **parameters: Unpack[GenerateParameters]
    ) -> AsyncGenerator[StreamResponse, None]:
        """Yield one :class:`StreamResponse` per generated token; use with ``async for``."""
        return self._stream(_core.generate_stream_call(prompt, parameters))

    @overload
    def chat(
        self, messages: Messages, stream: Literal[False] = False, **params: Unpack[ChatParameters]
    ) -> Coroutine[Any, Any, ChatCompletion]: ...
    @overload
    def chat(
        self, messages: Messages, stream: Literal[True], **params: Unpack[ChatParameters]
    ) -> AsyncGenerator[ChatCompletionChunk, None]: ...
    def chat(
        self, messages: Messages, stream: bool = False, **params: Unpack[ChatParameters]
    ) -> Coroutine[Any, Any, ChatCompletion] | AsyncGenerator[ChatCompletionChunk, None]:
        """Chat on the OpenAI route: ``await client.chat(m)`` for a whole reply, or
        ``async for chunk in client.chat(m, stream=True)`` for typed chunks (no ``await``,
        like :meth:`generate_stream`)."""
        if stream:
            return self._stream(_core.chat_stream_call(messages, params))
        return self._request(_core.chat_call(messages, params))

    async def close(self) -> None:
        """Close the connection pool (only if this client created it)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _request(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            with _core.transport_errors():
                response = await self._http.post(
                    self._url(call), json=call.body, headers=self._headers
                )
            try:
                return _core.read_response(
                    call, response.status_code, response.headers, response.content
                )
            except ClientError as error:
                delay = self._retry.delay(attempt, error)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            attempt += 1

    async def _stream(self, call: Call[T]) -> AsyncGenerator[T, None]:
        attempt = 0
        while True:
            reader = _core.StreamReader(call)
            try:
                follow = self._follow(
                    reader, "POST", self._url(call), call.body, self._stream_headers
                )
                async with contextlib.aclosing(follow) as items:
                    async for item in items:
                        yield item
                return
            except OverloadedError as error:
                # Retrying is safe only before the first token reached the caller.
                delay = None if reader.started else self._retry.delay(attempt, error)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            attempt += 1

    async def _follow(
        self,
        reader: _core.StreamReader[T],
        method: str,
        url: str,
        body: Any,
        headers: Mapping[str, str],
    ) -> AsyncGenerator[T, None]:
        """The stream's items; after a dropped connection, its resume's."""
        while True:
            try:
                with _core.transport_errors():
                    async with self._http.stream(
                        method, url, json=body, headers=headers
                    ) as response:
                        status, response_headers = response.status_code, response.headers
                        if not _core.is_event_stream(status, response_headers):
                            content = await response.aread()
                            raise _core.error_from_non_stream(status, response_headers, content)
                        reader.connected(response_headers)
                        async for chunk in response.aiter_bytes():
                            for item in reader.feed(chunk):
                                yield item
                reader.end()
                return
            except ClientError as error:
                resume = reader.resume_after(error)
                if resume is None:
                    raise
                method, url, body, headers = self._resume_request(resume)
