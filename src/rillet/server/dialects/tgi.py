"""TGI's dialect: ``GenerateRequest`` bodies in, TGI's JSON out (no transport here).

Bodies are lenient (``fields.py``). Where TGI is stricter than useful we are lenient, on
purpose and only there: ``temperature: 0`` means greedy (TGI: 422), ``top_p: 1.0`` means
"off" (TGI: 422, its issue #2222) and ``top_k: 0`` means "off". Everything else follows
``router/src/validation.rs``: at most ``max_stop_sequences`` stop sequences,
``top_n_tokens`` <= ``max_top_n_tokens``, no ``decoder_input_details`` when streaming, and
sampling is on when ``do_sample`` is true *or* any sampling knob is set.

Streams follow ``router/src/server.rs::generate_stream_internal``: one event per generated
token with ``index`` from 1 (``text: ""`` while a UTF-8 character is incomplete, EOS sent
with ``special: true``), ``generated_text``/``details`` null until the last event.

A request its timeout ended (``X-Rillet-Timeout-Ms``) ends with finish reason ``length`` and
``"rillet_finish_detail": "timeout"`` in the last event (and the answer). If no token came
since the last event, that last event carries an empty special token of id 0 (TGI's clients
need a ``token`` on every event, and skip special ones in text).

With ``X-Rillet-Timing: 1`` every event ends with ``rillet_timing`` (``server/timing.py``):
``tokens`` is 1 per event (0 on such an empty last one), the last event has the summary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rillet.constraint import Constraint
from rillet.errors import RilletError, ValidationError
from rillet.protocol import GeneratedToken, GeneratedTopToken, PromptToken, RequestOutput
from rillet.sampling import SamplingParams
from rillet.server.config import ServerConfig
from rillet.server.dialects.fields import Lenient, Stop, clean_logprob, stop_list
from rillet.server.sampling_defaults import DEFAULTABLE
from rillet.server.spec import GenerationSpec
from rillet.server.timing import TIMING_KEY, StreamTiming

if TYPE_CHECKING:
    from rillet.tokenizer import Tokenizer


class GenerateParameters(Lenient):
    """TGI's ``GenerateParameters`` (``router/src/lib.rs``)."""

    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool | None = None
    max_new_tokens: int | None = None
    return_full_text: bool | None = None
    stop: Stop = None
    truncate: int | None = None
    watermark: bool | None = None
    details: bool | None = None
    decoder_input_details: bool | None = None
    seed: int | None = None
    top_n_tokens: int | None = None
    grammar: dict[str, Any] | None = None
    adapter_id: str | None = None


class GenerateRequest(Lenient):
    """``/generate``, ``/generate_stream``, ``/tokenize`` and (with ``stream``) ``/``.

    ``parameters`` omitted entirely is not the same as ``{}``: TGI then samples
    (``default_parameters()`` has ``do_sample: true``).
    """

    inputs: str
    parameters: GenerateParameters | None = None
    stream: bool | None = None


@dataclass
class TgiPlan:
    """A TGI request ready to run, plus what its answer has to show."""

    spec: GenerationSpec
    details: bool
    decoder_input_details: bool
    top_n_tokens: int
    #: ``generated_text`` starts with this (the prompt, with ``return_full_text``).
    prefix: str
    #: Reported in ``details.seed``: the seed used when sampling, else None (as TGI).
    seed: int | None


def plan(
    body: GenerateRequest, config: ServerConfig, *, stream: bool, full_text_default: bool
) -> TgiPlan:
    """Validate ``body`` and map it; raises ValidationError (422)."""
    p = body.parameters if body.parameters is not None else GenerateParameters(do_sample=True)
    if p.best_of is not None and p.best_of > 1:
        raise ValidationError("`best_of` > 1 is not supported by this server")
    if p.decoder_input_details and stream:
        raise ValidationError(
            "`decoder_input_details` == true is not supported when streaming tokens"
        )
    if p.temperature is not None and p.temperature < 0:
        raise ValidationError("`temperature` must be strictly positive")
    stop = stop_list(p.stop)  # their number and length: GenerationService._check_shape
    top_n = p.top_n_tokens or 0
    if not 0 <= top_n <= config.max_top_n_tokens:
        raise ValidationError(
            f"`top_n_tokens` must be >= 0 and <= {config.max_top_n_tokens}. Given: {top_n}"
        )
    sampling = bool(p.do_sample) or any(
        v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p)
    )
    if p.temperature == 0:  # lenient: an explicit 0 is greedy, whatever do_sample says
        sampling = False
    seed = None
    if sampling:
        seed = p.seed if p.seed is not None else random.getrandbits(63)
    params = SamplingParams(
        max_new_tokens=p.max_new_tokens,
        temperature=(p.temperature or 1.0) if sampling else 0.0,
        top_k=p.top_k or 0,
        top_p=p.top_p if p.top_p is not None else 1.0,
        typical_p=p.typical_p if p.typical_p is not None else 1.0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        seed=seed,
        stop=stop,
        # TGI keeps the stop sequence in generated_text and streams its tokens.
        include_stop_str_in_output=True,
        logprobs=True,
        top_logprobs=top_n,
        prompt_logprobs=bool(p.decoder_input_details),
        constraint=None if p.grammar is None else grammar_constraint(p.grammar),
    )
    full_text = p.return_full_text if p.return_full_text is not None else full_text_default
    # TGI is greedy unless the request samples; a sampling request's unset fields are the
    # server's to fill (sampling_defaults.py).
    unset = frozenset(name for name in DEFAULTABLE if sampling and getattr(p, name, None) is None)
    return TgiPlan(
        spec=GenerationSpec(body.inputs, params, truncate=p.truncate, unset=unset),
        details=bool(p.details),
        decoder_input_details=bool(p.decoder_input_details),
        top_n_tokens=top_n,
        prefix=body.inputs if full_text else "",
        seed=seed,
    )


def grammar_constraint(grammar: dict[str, Any]) -> Constraint:
    """TGI's ``GrammarType`` (``router/src/lib.rs``: serde tag ``type``, content ``value``).

    ``json`` (alias ``json_object``) takes a schema as an object or as JSON text;
    ``json_schema`` takes ``{"name", "schema"}``; ``regex`` a pattern. TGI also insists on a
    top-level ``properties``; any schema is accepted here.
    """
    kind, value = grammar.get("type"), grammar.get("value")
    if value is None or value == "":
        raise ValidationError("`grammar.value` is required")
    if kind in ("json", "json_object"):
        return Constraint.json_schema(value)
    if kind == "json_schema":
        if not isinstance(value, dict) or "schema" not in value:
            raise ValidationError('`grammar.value` must be {"name": ..., "schema": {...}}')
        return Constraint.json_schema(value["schema"])
    if kind == "regex":
        if not isinstance(value, str):
            raise ValidationError("a regex grammar's `value` must be a string")
        return Constraint.regex(value)
    raise ValidationError(
        f"`grammar.type` must be one of json, json_object, json_schema, regex. Given: {kind!r}"
    )


_ERROR_PREFIX = {
    "validation": "Input validation error: ",
    "generation": "Request failed during generation: ",
}


def error_body(exc: RilletError) -> dict[str, str]:
    """TGI's ``ErrorResponse``; messages carry TGI's ``InferError`` prefixes."""
    prefix = _ERROR_PREFIX.get(exc.error_type, "")
    message = exc.message if exc.message.startswith(prefix) else prefix + exc.message
    return {"error": message, "error_type": exc.error_type}


class TgiRenderer:
    """TGI's JSON for one planned request: stream events and the whole answer."""

    def __init__(
        self, tokenizer: Tokenizer, planned: TgiPlan, timing: StreamTiming | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.plan = planned
        self.timing = timing
        self._index = 0
        self._text = ""

    def token(self, token: GeneratedToken | GeneratedTopToken) -> dict[str, Any]:
        """TGI's ``Token``. A special token shows its own text (``</s>``), as TGI streams
        it, though ``generated_text`` skips it."""
        text = token.text
        if token.special and not text:
            text = self.tokenizer.decode([token.id], skip_special_tokens=False)
        return {
            "id": token.id,
            "text": text,
            "logprob": clean_logprob(token.logprob),
            "special": token.special,
        }

    def events(self, out: RequestOutput) -> list[dict[str, Any]]:
        """``StreamResponse`` events for one engine output: one per token (and one with an
        empty token for an output that ends the stream without one: a timeout)."""
        plan = self.plan
        self._text += out.text
        events = []
        tokens = [self.token(t) for t in out.tokens]
        if out.finished and not tokens:
            tokens.append(_NO_TOKEN)
        for i, token in enumerate(tokens):
            self._index += 1
            last = out.finish_reason is not None and i == len(tokens) - 1
            event: dict[str, Any] = {"index": self._index, "token": token}
            if plan.top_n_tokens:
                top = out.tokens[i].top if i < len(out.tokens) else []
                event["top_tokens"] = [self.token(t) for t in top]
            event["generated_text"] = plan.prefix + self._text if last else None
            event["details"] = None
            if last and plan.details and out.finish_reason is not None:
                event["details"] = {
                    "finish_reason": out.finish_reason.value,
                    "generated_tokens": out.num_generated_tokens,
                    "seed": plan.seed,
                    "input_length": out.num_prompt_tokens,
                }
            if last and out.finish_detail is not None:
                event["rillet_finish_detail"] = out.finish_detail
            if self.timing is not None:  # one token per event (none on a timeout's last)
                delivered = 1 if i < len(out.tokens) else 0
                event[TIMING_KEY] = self.timing.stamp(out, final=last, tokens=delivered)
            events.append(event)
        return events

    def answer(self, result: RequestOutput) -> dict[str, Any]:
        """``GenerateResponse`` for a whole (merged) generation."""
        plan = self.plan
        answer: dict[str, Any] = {"generated_text": plan.prefix + result.text}
        if plan.details:
            assert result.finish_reason is not None
            details: dict[str, Any] = {
                "finish_reason": result.finish_reason.value,
                "generated_tokens": result.num_generated_tokens,
                "seed": plan.seed,
                "prefill": _prefill(result.prompt_tokens) if plan.decoder_input_details else [],
                "tokens": [self.token(t) for t in result.tokens],
            }
            if plan.top_n_tokens:
                details["top_tokens"] = [[self.token(a) for a in t.top] for t in result.tokens]
            answer["details"] = details
        if result.finish_detail is not None:
            answer["rillet_finish_detail"] = result.finish_detail
        return answer


#: The token of a last event that came without one (a timeout between tokens).
_NO_TOKEN: dict[str, Any] = {"id": 0, "text": "", "logprob": None, "special": True}


def _prefill(tokens: list[PromptToken] | None) -> list[dict[str, Any]]:
    return [{"id": t.id, "text": t.text, "logprob": clean_logprob(t.logprob)} for t in tokens or []]
