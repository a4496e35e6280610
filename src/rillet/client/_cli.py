"""What ``rillet chat`` and ``rillet generate`` share: server arguments and error reporting."""

from __future__ import annotations

import argparse
import sys

from rillet.client.errors import APIConnectionError, ClientError
from rillet.client.http import Client

DEFAULT_URL = "http://127.0.0.1:8080"


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """``--url``, ``--api-key`` and ``--timeout``."""
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"server address (default {DEFAULT_URL})"
    )
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for each chunk (default 120)"
    )


def make_client(args: argparse.Namespace) -> Client:
    """A client for the server named on the command line."""
    return Client(args.url, args.api_key, timeout=args.timeout)


def report_error(error: ClientError, url: str) -> None:
    """One readable line on stderr: what failed, in the server's own words."""
    if isinstance(error, APIConnectionError):
        print(f"error: cannot reach {url} ({error.message})", file=sys.stderr)
    else:
        print(f"error ({error.error_type}): {error.message}", file=sys.stderr)
