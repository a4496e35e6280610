"""``rillet chat``: an interactive terminal chat against a running server.

Each reply streams as it is produced over the OpenAI route (the server applies the model's
chat template) and the conversation is kept, so every request carries the whole history.
Ctrl-C during a reply closes that stream, which makes the server abort the generation, and
returns to the prompt; Ctrl-C or Ctrl-D at the prompt leaves.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from rillet.client._cli import add_server_arguments, make_client, report_error
from rillet.client.errors import ClientError
from rillet.client.http import Client

PROMPT = ">>> "
HELP = """commands:
  /set NAME VALUE   set a request parameter (max_tokens, temperature, top_p, seed)
  /reset            forget the conversation (keeps --system)
  /exit             leave (as do Ctrl-D and Ctrl-C at the prompt)"""

_SETTABLE: dict[str, type] = {"max_tokens": int, "temperature": float, "top_p": float, "seed": int}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``chat`` subcommand to an ``argparse`` subparsers object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "chat",
        help="chat with a running server in the terminal",
        description="Interactive chat over /v1/chat/completions. Ctrl-C stops a reply.",
    )
    add_server_arguments(parser)
    parser.add_argument("--system", help="system message that starts the conversation")
    parser.add_argument("--model", help="model name to send (default: the server's)")
    parser.add_argument("--max-tokens", type=int, help="per reply (default: the server's)")
    parser.add_argument("--temperature", type=float, help="0 means greedy")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.set_defaults(func=main)
    return parser


@dataclass(slots=True)
class Reply:
    """What one streamed reply produced, whole or stopped."""

    text: str
    num_tokens: int
    seconds: float
    prompt_tokens: int | None
    stopped: bool


def main(args: argparse.Namespace) -> int:
    """Run ``rillet chat``; returns the process exit code."""
    with contextlib.suppress(ImportError):  # line editing and history for input()
        import readline  # noqa: F401
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    params: dict[str, Any] = {
        name: getattr(args, name)
        for name in (*_SETTABLE, "model")
        if getattr(args, name) is not None
    }
    out = sys.stdout
    print(f"rillet chat with {args.url}. Ctrl-C stops a reply; /help for commands.", file=out)
    with make_client(args) as client:
        while True:
            try:
                line = input(PROMPT)
            except (EOFError, KeyboardInterrupt):
                print(file=out)
                return 0
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if text in ("/exit", "/quit"):
                    return 0
                if text == "/reset":
                    history = list(system)
                    print("[conversation cleared]", file=out)
                else:
                    print(_command(text, params), file=out)
                continue
            history.append({"role": "user", "content": line})
            try:
                reply = stream_reply(client, history, params, out)
            except ClientError as error:
                history.pop()  # the turn never happened; let the user try again
                report_error(error, args.url)
                continue
            if reply.text:
                history.append({"role": "assistant", "content": reply.text})
            else:
                history.pop()
            print(_stats(reply), file=out)


def stream_reply(
    client: Client, history: list[dict[str, str]], params: dict[str, Any], out: TextIO
) -> Reply:
    """Stream one reply to ``out``; Ctrl-C stops it and returns what came so far."""
    started = time.perf_counter()
    stream = client.chat(history, stream=True, stream_options={"include_usage": True}, **params)
    pieces: list[str] = []
    num_deltas = 0
    usage = None
    stopped = False
    try:
        for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                if choice.delta.content:
                    num_deltas += 1
                    pieces.append(choice.delta.content)
                    out.write(choice.delta.content)
                    out.flush()
    except KeyboardInterrupt:
        stopped = True
    finally:
        # Closing the stream closes the connection, and the server aborts the generation.
        stream.close()
    return Reply(
        text="".join(pieces),
        num_tokens=usage.completion_tokens if usage is not None else num_deltas,
        seconds=time.perf_counter() - started,
        prompt_tokens=usage.prompt_tokens if usage is not None else None,
        stopped=stopped,
    )


def _stats(reply: Reply) -> str:
    rate = reply.num_tokens / reply.seconds if reply.seconds > 0 else 0.0
    parts = [f"{reply.num_tokens} tokens", f"{rate:.1f} tokens/s"]
    if reply.prompt_tokens is not None:
        parts.append(f"prompt {reply.prompt_tokens} tokens")
    prefix = "\n[stopped] " if reply.stopped else "\n"
    return f"{prefix}[{', '.join(parts)}]"


def _command(text: str, params: dict[str, Any]) -> str:
    """Handle ``/set`` and ``/help``; returns what to print."""
    words = text.split()
    if words[0] == "/set" and len(words) == 3 and words[1] in _SETTABLE:
        try:
            params[words[1]] = _SETTABLE[words[1]](words[2])
        except ValueError:
            return f"[{words[1]} needs a {_SETTABLE[words[1]].__name__}]"
        return f"[{words[1]} = {params[words[1]]}]"
    return HELP
