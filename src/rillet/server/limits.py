"""Token limits: how long a prompt may be and how many tokens may follow it. One check.

Every door asks the same two questions of a tokenized request (TGI's ``validation.rs``
asks them too): is the prompt within ``max_input_tokens``, and does the prompt plus the
requested token cap fit ``max_total_tokens``? A request without a cap gets the room that
is left. The message is the same on every door; only the field names are the client's own
(TGI says ``inputs`` and ``max_new_tokens``, OpenAI ``prompt`` and ``max_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rillet.errors import ValidationError
from rillet.sampling import SamplingParams


@dataclass(frozen=True)
class FieldNames:
    """How a door's clients spell the prompt, the token cap and prompt truncation."""

    prompt: str = "inputs"
    max_new_tokens: str = "max_new_tokens"
    truncate: str = "truncate"


TGI_FIELDS = FieldNames()


@dataclass(frozen=True)
class TokenLimits:
    """``max_input_tokens < max_total_tokens <= the engine's context``."""

    max_input_tokens: int
    max_total_tokens: int

    @classmethod
    def resolve(
        cls, max_input_tokens: int | None, max_total_tokens: int | None, max_model_len: int
    ) -> TokenLimits:
        """Settle the configured limits (``None`` = follow the context) for an engine."""
        total = min(max_total_tokens or max_model_len, max_model_len)
        max_input = min(max_input_tokens or total - 1, total - 1)
        if max_input <= 0:
            raise ValueError("--max-total-tokens leaves no room for input tokens")
        return cls(max_input, total)

    def check_truncate(self, truncate: int, names: FieldNames = TGI_FIELDS) -> None:
        if not 0 < truncate <= self.max_input_tokens:
            raise ValidationError(
                f"`{names.truncate}` must be strictly positive and less than "
                f"{self.max_input_tokens}. Given: {truncate}"
            )

    def fits(self, num_prompt_tokens: int, max_new_tokens: int | None) -> bool:
        """Whether a prompt of this length (and this cap, if any) is within the limits."""
        if num_prompt_tokens > self.max_input_tokens:
            return False
        return max_new_tokens is None or num_prompt_tokens + max_new_tokens <= self.max_total_tokens

    def check_cap(self, params: SamplingParams, names: FieldNames = TGI_FIELDS) -> None:
        """A token cap, when given, is positive (checked before the prompt is tokenized)."""
        if params.max_new_tokens is not None and params.max_new_tokens <= 0:
            raise ValidationError(f"`{names.max_new_tokens}` must be strictly positive")

    def apply(
        self, num_prompt_tokens: int, params: SamplingParams, names: FieldNames = TGI_FIELDS
    ) -> SamplingParams:
        """Refuse a request over the limits (ValidationError, the message names the client's
        fields); return ``params`` with an unset ``max_new_tokens`` set to the room left."""
        cap = params.max_new_tokens
        if num_prompt_tokens > self.max_input_tokens:
            raise ValidationError(
                f"`{names.prompt}` must have less than {self.max_input_tokens} tokens. "
                f"Given: {num_prompt_tokens}"
            )
        if cap is None:
            return replace(params, max_new_tokens=self.max_total_tokens - num_prompt_tokens)
        if num_prompt_tokens + cap > self.max_total_tokens:
            raise ValidationError(
                f"`{names.prompt}` tokens + `{names.max_new_tokens}` must be <= "
                f"{self.max_total_tokens}. Given: {num_prompt_tokens} `{names.prompt}` tokens "
                f"and {cap} `{names.max_new_tokens}`"
            )
        return params
