"""What a dialect hands the generation service: a prompt, sampling params and limits' words.

A dialect (TGI, OpenAI, plain text, KServe, the WebSocket frames) reads its own body and
produces a :class:`GenerationSpec`; the service tokenizes it, applies the chat template,
checks the token limits and runs it. Nothing here knows a transport.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rillet.sampling import SamplingParams
from rillet.server.limits import TGI_FIELDS, FieldNames


@dataclass
class ChatPrompt:
    """Messages to render with the model's chat template.

    ``drop_oldest_turns``: when the rendered conversation does not fit the limits, drop the
    oldest turns (system messages and the last turn are kept) instead of refusing it. The
    WebSocket chat keeps a conversation per connection and wants this; an API request that
    is too long is refused instead, as OpenAI does.

    ``tools``: function tools for the template (OpenAI's shape), see ``rillet.chat_tools``.
    """

    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    drop_oldest_turns: bool = False
    tools: list[dict[str, Any]] | None = None


Prompt = str | list[int] | ChatPrompt


@dataclass
class GenerationSpec:
    """One request as the service runs it.

    ``truncate`` keeps only the last N prompt tokens (TGI's ``truncate``). ``names`` are
    the client's words for the fields a limit error talks about. ``unset`` names the
    sampling fields the request left to the server, which its defaults then fill
    (``sampling_defaults.py``); ``params`` holds the API's own defaults for them.
    """

    prompt: Prompt
    params: SamplingParams
    truncate: int | None = None
    names: FieldNames = field(default=TGI_FIELDS)
    unset: frozenset[str] = frozenset()
