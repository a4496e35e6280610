"""TGI ``GenerateParameters`` -> a validated engine request, with TGI's rules and messages.

Where TGI is stricter than useful we are lenient, on purpose and only there:
``temperature: 0`` means greedy (TGI: 422), ``top_p: 1.0`` means "off" (TGI: 422, issue
#2222), ``top_k: 0`` means "off", and ``stop`` may be a single string. Everything else
follows ``router/src/validation.rs``: at most ``max_stop_sequences`` (4) stop sequences,
``top_n_tokens`` <= 5, no ``decoder_input_details`` when streaming, input and total token
limits, and sampling is on when ``do_sample`` is true *or* any sampling knob is set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rillet.errors import ValidationError
from rillet.protocol import EngineRequest
from rillet.sampling import SamplingParams
from rillet.server.schemas import GenerateParameters, GenerateRequest, stop_list
from rillet.server.state import ServerState


@dataclass
class TgiPlan:
    """A TGI request ready to run, plus what its answer has to show."""

    request: EngineRequest
    details: bool
    decoder_input_details: bool
    top_n_tokens: int
    #: ``generated_text`` starts with this (the prompt, with ``return_full_text``).
    prefix: str
    #: Reported in ``details.seed``: the seed used when sampling, else None (as TGI).
    seed: int | None


def plan_tgi(
    state: ServerState, body: GenerateRequest, *, stream: bool, full_text_default: bool
) -> TgiPlan:
    """Validate ``body`` and build its engine request; raises ValidationError (422)."""
    # TGI's default_parameters() samples when "parameters" is absent altogether.
    p = body.parameters if body.parameters is not None else GenerateParameters(do_sample=True)
    config = state.config
    if p.best_of is not None and p.best_of > 1:
        raise ValidationError("`best_of` > 1 is not supported by this server")
    if p.grammar is not None:
        raise ValidationError("grammar is not supported by this server")
    if p.decoder_input_details and stream:
        raise ValidationError(
            "`decoder_input_details` == true is not supported when streaming tokens"
        )
    if p.temperature is not None and p.temperature < 0:
        raise ValidationError("`temperature` must be strictly positive")
    stop = stop_list(p.stop)
    if len(stop) > config.max_stop_sequences:
        raise ValidationError(
            f"`stop` supports up to {config.max_stop_sequences} stop sequences. Given: {len(stop)}"
        )
    top_n = p.top_n_tokens or 0
    if not 0 <= top_n <= config.max_top_n_tokens:
        raise ValidationError(
            f"`top_n_tokens` must be >= 0 and <= {config.max_top_n_tokens}. Given: {top_n}"
        )
    sampling = bool(p.do_sample) or any(
        v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p)
    )
    # Lenient: an explicit temperature of 0 is greedy, whatever do_sample says.
    if p.temperature == 0:
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
    )
    request = _make_request(state, body.inputs, params, p.truncate)
    full_text = p.return_full_text if p.return_full_text is not None else full_text_default
    return TgiPlan(
        request=request,
        details=bool(p.details),
        decoder_input_details=bool(p.decoder_input_details),
        top_n_tokens=top_n,
        prefix=body.inputs if full_text else "",
        seed=seed,
    )


def _make_request(
    state: ServerState, inputs: str, params: SamplingParams, truncate: int | None
) -> EngineRequest:
    """Tokenize, truncate, and check TGI's input/total token limits."""
    max_input, max_total = state.max_input_tokens, state.max_total_tokens
    if params.max_new_tokens is not None and params.max_new_tokens <= 0:
        raise ValidationError("`max_new_tokens` must be strictly positive")
    prompt: str | list[int] = inputs
    if truncate is not None:
        if not 0 < truncate <= max_input:
            raise ValidationError(
                f"`truncate` must be strictly positive and less than {max_input}. Given: {truncate}"
            )
        if not inputs:
            raise ValidationError("`inputs` cannot be empty")
        prompt = state.engine.tokenizer.encode(inputs)[-truncate:]
    request = state.engine.make_request(prompt, params)
    num_input = len(request.prompt_token_ids)
    if num_input > max_input:
        raise ValidationError(
            f"`inputs` must have less than {max_input} tokens. Given: {num_input}"
        )
    if params.max_new_tokens is None:
        params.max_new_tokens = max_total - num_input
    elif num_input + params.max_new_tokens > max_total:
        raise ValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {max_total}. Given: {num_input} "
            f"`inputs` tokens and {params.max_new_tokens} `max_new_tokens`"
        )
    return request
