"""The outputs of a KServe v2 response, as vLLM's Triton backend names and fills them.

``text_output`` (the delta since the last response when streaming; the whole answer, after
the prompt unless it is excluded, when not), and for each ``return_*`` input its output:
``finish_reason`` (BYTES; ``"None"`` until the last response, as vLLM's backend sends it),
``num_input_tokens`` and ``num_output_tokens`` (UINT32; output tokens in this response),
``logprobs`` (BYTES, a JSON list) and ``cumulative_logprob`` (FP32). Both Triton doors
send them: gRPC as raw tensors, HTTP as JSON keys. A request with ``timing`` in its
parameters (gRPC; ``X-Rillet-Timing: 1`` on HTTP) has ``rillet_timing`` on every streamed
response: gRPC as a string parameter holding its JSON, HTTP as a key of the event
(``server/timing.py``); the final response's has the summary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rillet.protocol import RequestOutput
from rillet.server.dialects.fields import clean_logprob
from rillet.server.kserve.dialect import KServePlan
from rillet.server.timing import StreamTiming


@dataclass
class Output:
    """One output tensor of a response: its name, its datatype and its elements."""

    name: str
    datatype: str
    values: list[Any]


class KServeRenderer:
    """The outputs of each response of one request: :meth:`delta` for each streamed
    response, or :meth:`answer` for the one response that carries the whole generation."""

    def __init__(self, planned: KServePlan, timing: StreamTiming | None = None) -> None:
        self.plan = planned
        self.timing = timing
        self._cumulative_logprob = 0.0

    def stamp(self, out: RequestOutput, final: bool) -> dict[str, Any] | None:
        """A streamed response's ``rillet_timing`` (None unless the request asked): a
        response parameter on gRPC (its JSON text), a key of the event on HTTP."""
        return None if self.timing is None else self.timing.stamp(out, final=final)

    def delta(self, out: RequestOutput) -> list[Output]:
        """A streamed response's outputs: ``out``'s new text, final once ``out`` has finished."""
        return self._outputs(out, out.text, final=out.finished)

    def answer(self, result: RequestOutput) -> list[Output]:
        """The one response's outputs for a whole generation (``result``, every delta merged):
        its text after the prompt when the plan echoes it, and final."""
        return self._outputs(result, self.plan.echo + result.text, final=True)

    def _outputs(self, out: RequestOutput, text: str, final: bool) -> list[Output]:
        """The outputs for ``out`` carrying ``text``, in the order of the model's output list."""
        made = [Output("text_output", "BYTES", [text.encode()])]
        returns = self.plan.returns
        if "finish_reason" in returns:
            reason = out.finish_reason.to_openai() if final and out.finish_reason else "None"
            made.append(Output("finish_reason", "BYTES", [reason.encode()]))
        if "num_input_tokens" in returns:
            made.append(Output("num_input_tokens", "UINT32", [out.num_prompt_tokens]))
        if "num_output_tokens" in returns:
            made.append(Output("num_output_tokens", "UINT32", [len(out.tokens)]))
        if "logprobs" in returns:
            logprobs = [clean_logprob(t.logprob) for t in out.tokens]
            made.append(Output("logprobs", "BYTES", [json.dumps(logprobs).encode()]))
        if "cumulative_logprob" in returns:  # over the whole generation so far, as vLLM's
            self._cumulative_logprob += sum(t.logprob for t in out.tokens if t.logprob is not None)
            made.append(Output("cumulative_logprob", "FP32", [self._cumulative_logprob]))
        wanted = self.plan.requested_outputs
        return [o for o in made if o.name in wanted] if wanted else made
