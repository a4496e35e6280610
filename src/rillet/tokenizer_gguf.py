"""Rebuild a ``tokenizers.Tokenizer`` from the vocabulary a GGUF file carries.

A GGUF has no ``tokenizer.json``: llama.cpp stores the token strings, their types, and either
BPE merges (``tokenizer.ggml.model == "gpt2"``, byte-level BPE) or SentencePiece scores
(``"llama"``). The pre-tokenizer is named, not described (``tokenizer.ggml.pre``), so each name
we accept maps to the split llama.cpp applies for it; an unknown name is refused rather than
guessed, because a wrong split silently changes every prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from rillet.errors import ModelLoadError

# llama.cpp token types (llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(
    1, 7
)

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: ``tokenizer.ggml.pre`` values whose split is GPT-2's regex with every digit on its own.
_DIGIT_SPLIT_PRES = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
)
#: ``tokenizer.ggml.pre`` values that use GPT-2's regex unchanged.
_GPT2_PRES = frozenset({"default", "gpt2", "gpt-2", "mpt", "olmo", "jais"})
_REGEX_PRES = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
SUPPORTED_PRES = tuple(sorted(_DIGIT_SPLIT_PRES | _GPT2_PRES | _REGEX_PRES.keys()))


def build_gguf_backend(meta: Mapping[str, Any]) -> HFTokenizer:
    """A ``tokenizers.Tokenizer`` equivalent to llama.cpp's tokenizer for this GGUF metadata.

    Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
    tokens, so both are matched whole in text. BOS is prepended by the post-processor when the
    file's ``add_bos_token`` says so (default: yes for SentencePiece, no for byte-level BPE).
    """
    kind = meta.get("tokenizer.ggml.model")
    tokens: Sequence[str] | None = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError("GGUF file has no tokenizer.ggml.tokens: cannot build a tokenizer")
    types: Sequence[int] = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if kind == "gpt2":
        backend = _byte_level_bpe(meta, tokens, types)
        add_bos_default = False
    elif kind == "llama":
        backend = _sentencepiece_bpe(meta, tokens, types)
        add_bos_default = True
    else:
        raise ModelLoadError(
            f"unsupported GGUF tokenizer model {kind!r}: rillet reads 'gpt2' (byte-level BPE) "
            "and 'llama' (SentencePiece BPE)"
        )
    backend.add_special_tokens(
        [
            AddedToken(tok, special=True, normalized=False)
            for tok, typ in zip(tokens, types, strict=False)
            if typ == TOKEN_CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(tok, special=False, normalized=False)
            for tok, typ in zip(tokens, types, strict=False)
            if typ == TOKEN_USER_DEFINED
        ]
    )
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if bos_id is not None and bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)):
        bos = tokens[int(bos_id)]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, int(bos_id))],
        )
    return backend


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the byte-level alphabet)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


def _byte_level_bpe(
    meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int]
) -> HFTokenizer:
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    byte_char = _byte_to_unicode()
    alphabet = set(byte_char.values())
    vocab: dict[str, int] = {}
    for idx, tok in enumerate(tokens):
        # Some converters store plain tokens in raw UTF-8 (e.g. real spaces); the BPE model only
        # sees byte-alphabet strings, so respell those. Control/user tokens are matched whole and
        # keep their spelling.
        if types[idx] == TOKEN_NORMAL and not set(tok) <= alphabet:
            tok = "".join(byte_char[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, idx)
    merges: list[tuple[str, str]] = []
    for merge in meta.get("tokenizer.ggml.merges") or []:
        left, sep, right = str(merge).partition(" ")
        if not sep:
            raise ModelLoadError(f"GGUF tokenizer merge {merge!r} is not two tokens")
        merges.append((left, right))
    backend = HFTokenizer(
        models.BPE(vocab, merges, ignore_merges=pre in ("llama-bpe", "llama3"), fuse_unk=False)
    )
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The split llama.cpp applies for ``tokenizer.ggml.pre == pre``, as HF pre-tokenizers."""
    if pre in _GPT2_PRES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _REGEX_PRES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_REGEX_PRES[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ModelLoadError(
        f"unsupported GGUF pre-tokenizer {pre!r}; rillet knows {', '.join(SUPPORTED_PRES)}"
    )


def _sentencepiece_bpe(
    meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int]
) -> HFTokenizer:
    """SentencePiece BPE as llama.cpp runs it: merge the best-scoring adjacent pair first.

    That is BPE whose merge ranks follow the score of the merged token, so the merges are
    recovered from the vocabulary: every split of a token into two known pieces, best first.
    """
    scores: Sequence[float] = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab: dict[str, int] = {}
    for idx, tok in enumerate(tokens):
        vocab.setdefault(tok, idx)
    ranked: list[tuple[float, int, int, str, str]] = []
    for idx, tok in enumerate(tokens):
        if types[idx] not in (TOKEN_NORMAL, TOKEN_USER_DEFINED) or len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[idx]), vocab[left], vocab[right], left, right))
    ranked.sort()
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    backend = HFTokenizer(
        models.BPE(
            vocab,
            [(left, right) for *_, left, right in ranked],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    # llama.cpp adds the "▁" prefix once, before the first text fragment, and turns every space
    # into "▁"; Metaspace with prepend_scheme="first" does exactly that.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps: list[decoders.Decoder] = [
        decoders.Replace("▁", " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend
