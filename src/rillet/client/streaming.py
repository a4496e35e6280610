"""``StreamingClient``: NuPIC's callback client, on Triton's gRPC protocol (port 8001).

>>> client = StreamingClient("SmolLM2-135M-Instruct.Q4_1", url="localhost:8001")
>>> text = client.generate("Write a haiku about rivers.", callback=print_it)

``callback(text)`` is called once per piece of text as it is generated, in order, and
``generate`` returns the whole text (the pieces joined). ``messages=[...]`` sends a chat
instead of a prompt; the server applies the model's chat template. Sampling fields are
OpenAI's and vLLM's (``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ...).
:class:`AsyncStreamingClient` is the asyncio twin. Errors are the HTTP client's types
(``OverloadedError``, ``ValidationError``, ...). It needs grpcio and protobuf only: it
speaks ``inference.GRPCInferenceService`` (``ModelStreamInfer``) itself, without tritonclient.
"""

from __future__ import annotations

import inspect
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import grpc.aio

from rillet.client.errors import (
    APIConnectionError,
    APITimeoutError,
    ClientError,
    ProtocolError,
    parse_error,
)
from rillet.kserve import grpc_service_pb2 as pb
from rillet.kserve import tensors
from rillet.kserve.rpc import Stub

#: The error types behind gRPC status codes (the server's table, read backwards).
_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: "validation",
    grpc.StatusCode.UNAUTHENTICATED: "authentication",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
    grpc.StatusCode.INTERNAL: "generation",
}
#: The server's in-stream errors: ``[request id: X] error_type: message``.
_STREAM_ERROR = re.compile(r"^\[request id: [^\]]*\] ([a-z_]+): (.*)$", re.DOTALL)
_MAX_MESSAGE_BYTES = 64 << 20


def build_request(
    model_name: str,
    prompt: str | None,
    messages: list[dict[str, str]] | None,
    sampling: dict[str, Any],
) -> pb.ModelInferRequest:
    """One streamed ``ModelInferRequest`` (vLLM-backend tensors)."""
    if (prompt is None) == (messages is None):
        raise ValueError("give a prompt or messages (exactly one)")
    request = pb.ModelInferRequest(model_name=model_name, id=uuid.uuid4().hex)
    if messages is not None:
        first = ("messages", json.dumps(messages).encode())
    else:
        assert prompt is not None
        first = ("text_input", prompt.encode())
    for name, datatype, value in (
        (first[0], "BYTES", first[1]),
        ("stream", "BOOL", True),
        ("sampling_parameters", "BYTES", json.dumps(sampling).encode()),
    ):
        request.inputs.add(name=name, datatype=datatype, shape=[1])
        request.raw_input_contents.append(tensors.encode(datatype, [value]))
    request.outputs.add(name="text_output")
    return request


def text_of(response: pb.ModelStreamInferResponse) -> tuple[str, bool]:
    """``(text piece, is it the last response)``; a typed ClientError if it is an error."""
    if response.error_message:
        match = _STREAM_ERROR.match(response.error_message)
        error_type, message = match.groups() if match else (None, response.error_message)
        raise parse_error(None, {"error": message, "error_type": error_type})
    answer = response.infer_response
    final = answer.parameters["triton_final_response"].bool_param
    for i, output in enumerate(answer.outputs):
        if output.name == "text_output":
            raw = answer.raw_output_contents[i] if answer.raw_output_contents else None
            values = tensors.decode(
                output.name, output.datatype, list(output.shape), raw, output.contents
            )
            return b"".join(values).decode(), final
    if final:
        return "", True
    raise ProtocolError("a response without text_output")


def rpc_error(error: grpc.RpcError) -> ClientError:
    """A failed call as the HTTP client's error types."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        return APIConnectionError(f"cannot reach the server: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return APITimeoutError(f"the server did not answer in time: {details}")
    error_type = _BY_CODE.get(code) if code is not None else None
    return parse_error(None, {"error": details or str(code), "error_type": error_type})


_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
]


class _Base:
    """The model, the channel and the key; the twins differ in their channel's kind."""

    def __init__(
        self,
        model_name: str,
        url: str = "localhost:8001",
        *,
        api_key: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self.model_name = model_name
        self.url = url
        self.timeout = timeout
        self._metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        self._channel = self._open(url)
        self._stub = Stub(self._channel)

    def _open(self, url: str) -> Any:
        raise NotImplementedError


class StreamingClient(_Base):
    """Blocking client: ``generate(prompt, callback=...)`` streams over one gRPC call.

    Stopping early (an exception in the callback, Ctrl-C) cancels the call, and the server
    aborts the generation.
    """

    def _open(self, url: str) -> grpc.Channel:
        return grpc.insecure_channel(url, options=_OPTIONS)

    def generate(
        self,
        prompt: str | None = None,
        callback: Callable[[str], Any] | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        **sampling: Any,
    ) -> str:
        """Stream the reply to ``callback`` piece by piece; return all of it."""
        pieces = []
        for piece in self.stream(prompt, messages=messages, **sampling):
            pieces.append(piece)
            if callback is not None:
                callback(piece)
        return "".join(pieces)

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """The reply's pieces as an iterator (closing it early cancels the generation)."""
        request = build_request(self.model_name, prompt, messages, sampling)
        call = self._stub.ModelStreamInfer(
            iter([request]), metadata=self._metadata, timeout=self.timeout
        )
        try:
            for response in call:
                text, final = text_of(response)
                if text:
                    yield text
                if final:
                    return
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        finally:
            call.cancel()  # a no-op once the call has ended

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> StreamingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStreamingClient(_Base):
    """The asyncio twin: ``await generate(prompt, callback=...)``; the callback may be a
    plain function or a coroutine function."""

    def _open(self, url: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(url, options=_OPTIONS)

    async def generate(
        self,
        prompt: str | None = None,
        callback: Callable[[str], Any | Awaitable[Any]] | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        **sampling: Any,
    ) -> str:
        pieces = []
        async for piece in self.stream(prompt, messages=messages, **sampling):
            pieces.append(piece)
            if callback is not None:
                result = callback(piece)
                if inspect.isawaitable(result):
                    await result
        return "".join(pieces)

    async def stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        **sampling: Any,
    ) -> AsyncIterator[str]:
        request = build_request(self.model_name, prompt, messages, sampling)

        async def one_request() -> AsyncIterator[pb.ModelInferRequest]:
            yield request

        call = self._stub.ModelStreamInfer(
            one_request(), metadata=self._metadata, timeout=self.timeout
        )
        try:
            async for response in call:
                text, final = text_of(response)
                if text:
                    yield text
                if final:
                    return
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncStreamingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
