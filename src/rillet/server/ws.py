"""The WebSocket door: the Ray Serve tutorial's chat at ``/`` and the multiplexed ``/ws``.

Both stand on the generation service like every door: one admission count, the API key
(``Authorization: Bearer`` or ``?api_key=``, since browsers cannot set headers on a
WebSocket; refused at the handshake with 401), and one cancellation path: each generation
runs in a task, and a ``cancel`` frame or a closed socket cancels that task, which aborts
the request in the engine. A reader task watches the socket while generations run, so a
client that leaves mid-prefill is noticed at once, not at the next token.

Frames out go through one lock per socket and are awaited, so a slow reader slows only its
own generations (the engine merges their deltas meanwhile), never the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from rillet.errors import RilletError, ValidationError
from rillet.protocol import RequestOutput
from rillet.server.auth import bearer_token
from rillet.server.deadlines import RequestOptions
from rillet.server.dialects import tgi, ws
from rillet.server.generation import Generation
from rillet.server.service import GenerationService

log = logging.getLogger("rillet.server")

Send = Callable[[dict[str, Any]], Awaitable[None]]


def _service(websocket: WebSocket) -> GenerationService:
    service: GenerationService = websocket.app.state.rillet
    return service


async def _accept(websocket: WebSocket) -> GenerationService | None:
    """Check the key before the upgrade: a wrong one gets an HTTP 401, no socket."""
    service = _service(websocket)
    presented = bearer_token(websocket.headers.get("authorization"))
    if presented is None:
        presented = websocket.query_params.get("api_key")
    try:
        service.check_key(presented)
    except RilletError as exc:
        await refuse_handshake(websocket, exc)
        return None
    await websocket.accept()
    return service


async def refuse_handshake(websocket: WebSocket, exc: RilletError) -> None:
    """No socket: an HTTP answer with the error's status and TGI's JSON body instead."""
    try:
        await websocket.send_denial_response(JSONResponse(tgi.error_body(exc), exc.http_status))
    except RuntimeError:  # a server without the denial extension: policy violation
        await websocket.close(code=1008, reason=exc.message)


async def tutorial_chat(websocket: WebSocket) -> None:
    """Each text frame is the user's turn; the reply streams as text frames, then
    ``<<Response Finished>>``. The conversation lives as long as the socket; it keeps the
    last ``max_messages`` messages (older turns would be dropped to fit the context anyway)."""
    service = await _accept(websocket)
    if service is None:
        return
    conversation: list[dict[str, Any]] = []
    turns: asyncio.Queue[str | None] = asyncio.Queue()
    reader = asyncio.ensure_future(_read_texts(websocket, turns))
    try:
        while (text := await turns.get()) is not None:
            conversation.append({"role": "user", "content": text})
            del conversation[: -service.config.max_messages]
            turn = asyncio.ensure_future(_chat_reply(websocket, service, conversation))
            await asyncio.wait({turn, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not turn.done():  # the client left mid-reply
                turn.cancel()
                await asyncio.wait({turn})
                return
            reply = turn.result()
            if reply is None:
                conversation.pop()  # refused: the turn did not happen
            else:
                conversation.append({"role": "assistant", "content": reply})
            await websocket.send_text(ws.RESPONSE_FINISHED)
    except (WebSocketDisconnect, RuntimeError):
        return  # the client left between turns
    finally:
        reader.cancel()
        await asyncio.wait({reader})


async def _read_texts(websocket: WebSocket, turns: asyncio.Queue[str | None]) -> None:
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            await turns.put(message.get("text") or (message.get("bytes") or b"").decode())
    finally:
        turns.put_nowait(None)


async def _chat_reply(
    websocket: WebSocket, service: GenerationService, conversation: list[dict[str, Any]]
) -> str | None:
    """Stream one reply; its text, or None if it was refused (said in a text frame)."""
    try:
        max_total = service.limits.max_total_tokens
        generation, _ = service.start("ws_chat", lambda: ws.chat_turn(conversation, max_total))
    except RilletError as exc:
        await websocket.send_text(f"[{exc.error_type}] {exc.message}")
        return None
    return await generation.run(_stream_reply(websocket, generation))


async def _stream_reply(websocket: WebSocket, generation: Generation) -> str:
    reply = ""
    try:
        async with contextlib.aclosing(generation.stream()) as outputs:
            async for out in outputs:
                if out.text:
                    reply += out.text
                    await websocket.send_text(out.text)
    except RilletError as exc:
        await websocket.send_text(f"[{exc.error_type}] {exc.message}")
    return reply


class _Running:
    """One generation on a ``/ws`` socket. ``ended`` is set before its final frame goes out,
    so a cancel that arrives after that is a no-op (each generation ends exactly once)."""

    def __init__(self, frame_id: ws.FrameId, generation: Generation, plan: ws.WsPlan) -> None:
        self.frame_id = frame_id
        self.generation = generation
        self.plan = plan
        self.ended = False
        self.task: asyncio.Task[None] | None = None

    async def run(self, send: Send) -> None:
        """Stream the generation as frames (on the generation's own task)."""
        generation = self.generation
        try:
            async with contextlib.aclosing(generation.stream()) as outputs:
                async for out in outputs:
                    if out.text:
                        frame = ws.token_frame(
                            self.frame_id, out, self.plan.logprobs, generation.timing
                        )
                        await send(frame)
                    if out.finish_reason is not None:
                        self.ended = True
                        reason = out.finish_reason.to_openai()
                        await send(self.done(reason, out.finish_detail, out))
        except RilletError as exc:
            self.ended = True
            await send(ws.error_frame(self.frame_id, exc))

    def done(
        self,
        finish_reason: str,
        finish_detail: str | None = None,
        last: RequestOutput | None = None,
    ) -> dict[str, Any]:
        """The ``done`` frame after ``last``, the generation's last output (None: cancelled)."""
        generation = self.generation
        timing = generation.timing
        return ws.done_frame(
            self.frame_id,
            finish_reason,
            generation.num_prompt_tokens,
            generation.num_generated_tokens,
            finish_detail,
            None if timing is None else timing.stamp(last, final=True),
        )


async def multiplexed(websocket: WebSocket) -> None:
    """``/ws``: many generations on one socket, interleaved, each ended by one ``done`` or
    one ``error`` frame. Bad frames get an ``error`` frame and the socket stays open."""
    service = await _accept(websocket)
    if service is None:
        return
    lock = asyncio.Lock()

    async def send(frame: dict[str, Any]) -> None:
        async with lock:
            await websocket.send_text(json.dumps(frame, ensure_ascii=False))

    running: dict[ws.FrameId, _Running] = {}
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                refused = ValidationError("frames are JSON text; binary frames are not accepted")
                await send(ws.error_frame(None, refused))
                continue
            await _handle(service, text, running, send)
    except (WebSocketDisconnect, RuntimeError):
        return
    finally:
        tasks = {entry.task for entry in running.values() if entry.task is not None}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


async def _handle(
    service: GenerationService, text: str, running: dict[ws.FrameId, _Running], send: Send
) -> None:
    frame_id: ws.FrameId = None
    try:
        frame_id, kind, frame = ws.parse_frame(text)
        if kind == "cancel":
            await _cancel(running.get(frame_id), send)
            return
        if frame_id in running:
            raise ValidationError(f"a generation with id {frame_id!r} is already running")
        options = RequestOptions.from_fields(frame)
        generation, plan = service.start("ws", lambda: ws.plan_generate(frame), options)
    except ws.FrameError as exc:
        await send(ws.error_frame(exc.frame_id, exc.error))
        return
    except RilletError as exc:
        await send(ws.error_frame(frame_id, exc))
        return
    entry = _Running(frame_id, generation, plan)
    entry.task = generation.run(entry.run(send))
    running[frame_id] = entry
    # A done callback, not a ``finally`` in the task: it also runs for a task cancelled
    # before its first step (a cancel frame read right after its generate frame).
    entry.task.add_done_callback(lambda _: running.pop(frame_id, None))


async def _cancel(entry: _Running | None, send: Send) -> None:
    """End a running generation with ``finish_reason: cancelled``. A cancel for an id that
    is not running (already ended, or never was) is a no-op: its one final frame is sent."""
    if entry is None or entry.ended or entry.task is None or not entry.task.cancel():
        return
    entry.ended = True
    await asyncio.wait({entry.task})
    await send(entry.done("cancelled"))
