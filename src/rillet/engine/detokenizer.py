"""Text at the edge: token ids -> streamed text, stop strings, :class:`RequestOutput` deltas.

One class per step, for one request each:

* :class:`IncrementalDetokenizer` turns ids into one text piece per token, in O(1) amortised
  work per token, and never emits half a UTF-8 character.
* :class:`StopStringMatcher` finds stop strings across token boundaries, holding back only
  text that could still turn into one.
* :class:`RequestTextState` glues both: core :class:`TokenDelta` in, :class:`RequestOutput` out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from rillet.errors import ValidationError
from rillet.protocol import (
    FinishReason,
    GeneratedToken,
    GeneratedTopToken,
    PromptToken,
    RequestOutput,
    TokenDelta,
)
from rillet.sampling import SamplingParams

REPLACEMENT_CHAR = "\ufffd"
#: Tokens kept before the new ones when decoding: a token's text can depend on its left
#: neighbours (SentencePiece strips a leading space at the start of a decode).
CONTEXT_TOKENS = 4
#: The decode window slides back to its last few tokens once it reaches this length.
MAX_WINDOW_TOKENS = 16
#: A valid character is at most 4 bytes and every non-special token adds at least one, so
#: text that stays unfinished for this many tokens holds invalid bytes: release it.
MAX_HELD_TOKENS = 4


class TokenDecoder(Protocol):
    """What the text layer needs from a tokenizer (``rillet.tokenizer.Tokenizer`` fits)."""

    def decode(self, ids: list[int], /, skip_special_tokens: bool) -> str: ...

    def is_special(self, token_id: int, /) -> bool: ...


class IncrementalDetokenizer:
    """Decodes one request's output ids token by token.

    Each :meth:`push` re-decodes a short window of the latest ids and returns the text that
    became final. Text ending in U+FFFD may be a character whose remaining bytes come with
    the next token, so it is held back (the piece is ``""``) until it completes.

    Guarantee, for byte-level BPE tokenizers (GPT-2 style, which rillet's models use):
    ``"".join(pieces) + flush() == tokenizer.decode(output_ids, skip_special_tokens)``, for
    any ids, valid UTF-8 or not (the prompt gives context only and adds no text; the output
    is decoded as a continuation of it, which for byte-level BPE changes nothing). A piece
    contains U+FFFD only where the final decode has it too: bytes that can never become a
    character are released after :data:`MAX_HELD_TOKENS` tokens, all but the very last
    replacement character, which may still be an unfinished character. :meth:`flush` ends
    the request and releases everything, as the full decode would show it. Other decoders
    (e.g. SentencePiece byte fallback) get the same behaviour for valid text, best effort
    for invalid bytes.
    """

    def __init__(
        self,
        tokenizer: TokenDecoder,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = self._context(prompt_token_ids)
        text = self._decode(context)
        if text.endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character: its bytes would merge with the output's
            # and hide them, so the output is decoded on its own instead.
            context, text = [], ""
        self._window = context
        self._text = text  # decode of the window as of the last push
        self._num_emitted = len(text)  # chars of ``_text`` already returned (or context)
        self._num_held = 0  # consecutive text-changing pushes that released nothing
        self._num_since_emit = 0  # window tokens after the last one that released text
        self._slide_at = MAX_WINDOW_TOKENS

    def push(self, token_id: int) -> str:
        """Add one generated token; return its share of the text (``""`` while held)."""
        if self._skip_special_tokens and self._tokenizer.is_special(token_id):
            return ""  # the decode would drop it anyway
        self._window.append(token_id)
        text = self._decode(self._window)
        changed = text != self._text
        self._text = text
        end = len(text.rstrip(REPLACEMENT_CHAR))
        if end <= self._num_emitted and changed:
            self._num_held += 1
            if self._num_held >= MAX_HELD_TOKENS:
                # Invalid bytes: everything but the last char is final (a lossy UTF-8
                # decode turns only an unfinished trailing sequence into one U+FFFD).
                end = len(text) - 1
        piece = text[self._num_emitted : end]
        if piece:
            self._num_emitted = end
            self._num_held = 0
            self._num_since_emit = 0
        else:
            self._num_since_emit += 1
        if len(self._window) >= self._slide_at:
            self._slide()
        return piece

    def flush(self) -> str:
        """End of the request: return whatever is still held, U+FFFD included."""
        piece = self._text[self._num_emitted :]
        self._num_emitted = len(self._text)
        self._num_held = self._num_since_emit = 0
        return piece

    def _slide(self) -> None:
        # Keep the last few tokens as context, and every token since the last release: the
        # held tail's bytes all lie there, so the shorter window ends in the same tail.
        num_keep = max(CONTEXT_TOKENS, self._num_since_emit + 1)
        keep = self._window[-num_keep:]
        text = self._decode(keep)
        tail = self._text[self._num_emitted :]
        if num_keep >= len(self._window) or not text.endswith(tail):
            # Cannot shrink safely (only for exotic decoders): try again a bit later.
            self._slide_at = len(self._window) + MAX_WINDOW_TOKENS
            return
        self._window, self._text = keep, text
        self._num_emitted = len(text) - len(tail)
        self._slide_at = MAX_WINDOW_TOKENS

    def _context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        context: list[int] = []
        for token_id in reversed(prompt_token_ids):
            if len(context) == CONTEXT_TOKENS:
                break
            if not (self._skip_special_tokens and self._tokenizer.is_special(token_id)):
                context.append(token_id)
        return context[::-1]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


class StopStringMatcher:
    """Finds stop strings in a stream of text pieces, wherever the token boundaries fall.

    :meth:`feed` returns ``(visible_delta, matched_stop)``. It holds back the longest suffix
    of the text that is a proper prefix of some stop string, and releases it as soon as it
    cannot be one any more. The first stop string to be completed wins (the longer one if
    two end at the same character), so the result does not depend on how text is chunked.
    On a match the visible text ends right after the stop string when
    ``include_stop_str_in_output``, right before it otherwise; nothing after it ever shows.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool) -> None:
        if any(s == "" for s in stop):
            raise ValidationError("`stop` sequences must be non-empty strings")
        self._stops = list(dict.fromkeys(stop))
        self._include_stop = include_stop_str_in_output
        self._pending = ""
        self.matched: str | None = None
        #: After a match: how many chars at the end of the last piece lie beyond the stop.
        self.num_chars_after_stop = 0

    def feed(self, piece: str) -> tuple[str, str | None]:
        """Add the next piece of output text; see the class docstring."""
        if self.matched is not None:
            return "", None  # the text ended at the stop string
        text = self._pending + piece
        match = self._first_match(text)
        if match is not None:
            stop, start = match
            end = start + len(stop)
            self.matched, self._pending = stop, ""
            self.num_chars_after_stop = len(text) - end
            return text[: end if self._include_stop else start], stop
        num_hold = self._longest_partial_match(text)
        self._pending = text[len(text) - num_hold :]
        return text[: len(text) - num_hold], None

    def finish(self) -> str:
        """The request ended for another reason: release the held-back text."""
        pending, self._pending = self._pending, ""
        return "" if self.matched is not None else pending

    def _first_match(self, text: str) -> tuple[str, int] | None:
        # Held text never contains a whole stop string, so every match ends in the new piece.
        best: tuple[int, int, str, int] | None = None
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0:
                key = (start + len(stop), -len(stop), stop, start)
                best = key if best is None else min(best, key)
        return None if best is None else (best[2], best[3])

    def _longest_partial_match(self, text: str) -> int:
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


class RequestTextState:
    """All the text state of one request: core :class:`TokenDelta` -> :class:`RequestOutput`.

    After :meth:`process`, ``stop_hit`` says a stop string ended the request while the core
    still runs it: the caller must abort it there. Deltas that arrive after the end (the core
    stepped again before the abort landed) return ``None``. Stop strings are not looked for
    in the text of the first ``params.min_tokens`` tokens (vLLM's rule).
    """

    def __init__(
        self, tokenizer: TokenDecoder, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        self._tokenizer = tokenizer
        self.prompt_token_ids = list(prompt_token_ids)
        self._min_tokens = params.min_tokens
        self._detokenizer = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, params.skip_special_tokens
        )
        self._matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self.num_generated_tokens = 0
        #: Every visible text delta so far: the non-streaming answer once finished.
        self.output_text = ""
        self.finish_reason: FinishReason | None = None
        self.stop_hit = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def process(self, delta: TokenDelta) -> RequestOutput | None:
        """Turn one core delta into one output delta (``None`` if the request is over)."""
        if self.finished:
            return None
        tokens: list[GeneratedToken] = []
        visible: list[str] = []
        stop: str | None = None
        for i, token_id in enumerate(delta.new_token_ids):
            self.num_generated_tokens += 1
            piece, text, stop = self._feed(self._detokenizer.push(token_id))
            tokens.append(self._token(delta, i, token_id, piece))
            visible.append(text)
            if stop is not None:
                break  # later tokens lie beyond the end of the output
        if stop is None and delta.finish_reason is not None:
            piece, text, stop = self._feed(self._detokenizer.flush())
            if tokens:
                tokens[-1].text += piece  # the held bytes belong to the last tokens
            visible.append(text + self._matcher.finish())
        if stop is not None:
            self.finish_reason = FinishReason.STOP_SEQUENCE
            self.stop_hit = delta.finish_reason is None
        else:
            self.finish_reason = delta.finish_reason
        text = "".join(visible)
        self.output_text += text
        return RequestOutput(
            request_id=delta.request_id,
            tokens=tokens,
            text=text,
            finish_reason=self.finish_reason,
            num_prompt_tokens=len(self.prompt_token_ids),
            num_generated_tokens=self.num_generated_tokens,
            num_cached_tokens=delta.num_cached_tokens,
            prompt_tokens=self._prompt_tokens(delta.prompt_logprobs),
            stop_sequence=stop,
        )

    def _feed(self, piece: str) -> tuple[str, str, str | None]:
        """Piece -> (piece cut at the stop, visible text, matched stop)."""
        if self.num_generated_tokens <= self._min_tokens:
            return piece, piece, None
        text, stop = self._matcher.feed(piece)
        if stop is not None:
            piece = piece[: len(piece) - self._matcher.num_chars_after_stop]
        return piece, text, stop

    def _token(self, delta: TokenDelta, i: int, token_id: int, piece: str) -> GeneratedToken:
        top: list[GeneratedTopToken] = []
        if delta.top_logprobs is not None:
            top = [
                GeneratedTopToken(
                    alt.token_id,
                    self._raw_text(alt.token_id),
                    alt.logprob,
                    self._tokenizer.is_special(alt.token_id),
                )
                for alt in delta.top_logprobs[i]
            ]
        logprob = delta.logprobs[i] if delta.logprobs is not None else None
        return GeneratedToken(token_id, piece, logprob, self._tokenizer.is_special(token_id), top)

    def _prompt_tokens(self, logprobs: list[float | None] | None) -> list[PromptToken] | None:
        if logprobs is None:
            return None
        return [
            PromptToken(token_id, self._raw_text(token_id), logprob)
            for token_id, logprob in zip(self.prompt_token_ids, logprobs, strict=False)
        ]

    def _raw_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)
