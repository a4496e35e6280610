"""The API key check every door calls: HTTP routes, the WebSocket upgrade and gRPC metadata.

A door only finds the presented key where its clients put it (``Authorization: Bearer``,
a ``?api_key=`` for browsers' WebSockets, ``authorization`` gRPC metadata); whether it is
right is decided here, once, in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from rillet.errors import AuthenticationError


def check_api_key(presented: str | None, configured: str | None) -> None:
    """Pass when no key is configured or ``presented`` equals it; else AuthenticationError."""
    if configured is None:
        return
    # compare_digest on bytes: its time does not depend on where the strings differ.
    if presented is None or not hmac.compare_digest(presented.encode(), configured.encode()):
        raise AuthenticationError("Invalid or missing API key (expected `Authorization: Bearer`)")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (scheme case-insensitive)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request presents: ``Authorization: Bearer``, else Anthropic's
    ``x-api-key`` (its SDK sends that one; with an auth token, a Bearer instead)."""
    return bearer_token(headers.get("authorization")) or headers.get("x-api-key")
