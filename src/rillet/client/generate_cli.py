"""``rillet generate "prompt"``: stream one completion to stdout as it is produced."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rillet.client._cli import add_server_arguments, make_client, report_error
from rillet.client.errors import ClientError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``generate`` subcommand to an ``argparse`` subparsers object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "generate",
        help="stream one completion of a prompt from a running server",
        description="Stream one completion of PROMPT (TGI /generate_stream) to stdout.",
    )
    parser.add_argument("prompt", help="the prompt; '-' reads it from stdin")
    add_server_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, help="default: the server's")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--typical-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--do-sample", action="store_true", default=None)
    parser.add_argument(
        "--stop", action="append", dest="stop_sequences", metavar="TEXT", help="repeatable"
    )
    parser.add_argument(
        "--details", action="store_true", help="print finish reason and token count to stderr"
    )
    parser.set_defaults(func=main)
    return parser


_PARAMETERS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "seed",
    "do_sample",
    "stop_sequences",
)


def main(args: argparse.Namespace) -> int:
    """Run ``rillet generate``; returns the process exit code."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    # Only what was given on the command line: ranges and defaults are the server's call.
    parameters: Any = {
        name: getattr(args, name) for name in _PARAMETERS if getattr(args, name) is not None
    }
    out = sys.stdout
    with make_client(args) as client:
        stream = client.generate_stream(prompt, **parameters)
        try:
            for response in stream:
                if not response.token.special:
                    out.write(response.token.text)
                    out.flush()
                if response.details is not None and args.details:
                    details = response.details
                    print(
                        f"\n[{details.finish_reason.value}, {details.generated_tokens} tokens]",
                        file=sys.stderr,
                        end="",
                    )
        except ClientError as error:
            out.write("\n")
            report_error(error, args.url)
            return 1
        except KeyboardInterrupt:
            stream.close()  # closes the connection: the server stops generating
            out.write("\n")
            return 130
    out.write("\n")
    return 0
