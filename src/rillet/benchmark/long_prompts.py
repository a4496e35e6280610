"""Prompts of an exact length in tokens, for ``rillet bench --input-tokens`` and
``--shared-prefix-tokens``.

The text is real English prose: the docstrings of Python's standard library, the same on
every machine with the same Python. Lengths are exact by the served model's tokenizer (the
text is cut at a token boundary, decoded, and re-encoded until it counts ``n`` tokens).

* ``--input-tokens N``: request ``i`` gets its own N-token document, starting with
  ``Document i.`` and then text from its own offset, so no prefix cache (rillet's, vLLM's,
  llama.cpp's slots) can serve any of it from another request;
* ``--shared-prefix-tokens N``: every request starts with the same N-token text, then a
  short question of its own (about 30 tokens), as chat traffic with one system prompt.
"""

from __future__ import annotations

import importlib
import itertools
import warnings
from collections.abc import Callable
from types import ModuleType

from rillet.benchmark.workload import PROMPTS

#: Modules whose docstrings make the corpus (long, plain prose; ~60k tokens together).
_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "functools", "heapq", "http.client", "inspect", "json",
    "logging", "pathlib", "pickle", "random", "re", "shutil", "sqlite3", "statistics",
    "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.request",
    "zipfile",
)  # fmt: skip

Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]


def corpus_text() -> str:
    """Every docstring (module, classes, functions) of the corpus modules, in order."""
    pieces: list[str] = []
    with warnings.catch_warnings():  # typing.io and friends warn when touched
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in _MODULES:
            _collect(importlib.import_module(name), pieces)
    return "\n\n".join(p.strip() for p in pieces if p.strip())


def _collect(module: ModuleType, pieces: list[str]) -> None:
    """The module's docstring, then the long ones of the public classes and functions it
    defines (in name order). Only its own and public: which submodules a package holds,
    and some private helpers (other libraries patch ``typing``'s), depend on what the
    process imported before, and the corpus must not."""
    pieces.append(module.__doc__ or "")
    for attr in sorted(vars(module)):
        if attr.startswith("_"):
            continue
        member = getattr(module, attr)
        if getattr(member, "__module__", None) != module.__name__:
            continue
        doc = getattr(member, "__doc__", None)
        if isinstance(doc, str) and len(doc) > 200 and doc not in pieces:
            pieces.append(doc)


def exact_text(encode: Encode, decode: Decode, lead: str, ids: list[int], n: int) -> str:
    """``lead`` plus text decoded from ``ids``, counting exactly ``n`` tokens by ``encode``.

    Re-encoding decoded text can merge or split tokens at the cut, so the cut moves until
    the count is right; where it jumps over ``n`` (one more id adds two tokens), the text
    starts one id later and tries again.
    """
    for skip in range(32):
        take = max(0, n - len(encode(lead)))
        for _ in range(12):
            text = lead + decode(ids[skip : skip + take])
            count = len(encode(text))
            if count == n:
                return text
            take += n - count
            if take < 0 or skip + take > len(ids):
                break
    raise ValueError(f"could not make a prompt of exactly {n} tokens")


class PromptSet:
    """``prompt(i)`` for every request index ``i`` of a run (see the module docstring)."""

    def __init__(
        self,
        encode: Encode,
        decode: Decode,
        input_tokens: int | None = None,
        shared_prefix_tokens: int | None = None,
    ) -> None:
        if (input_tokens is None) == (shared_prefix_tokens is None):
            raise ValueError("give one of --input-tokens and --shared-prefix-tokens")
        self.encode, self.decode = encode, decode
        self.ids = encode(corpus_text())
        self.input_tokens = input_tokens
        self._documents = itertools.count()
        self.shared = None
        if shared_prefix_tokens is not None:
            self.shared = exact_text(encode, decode, "", self.ids, shared_prefix_tokens)
        limit = input_tokens or shared_prefix_tokens or 0
        if limit * 2 > len(self.ids):
            raise ValueError(f"prompts of {limit} tokens need a longer corpus")

    def __call__(self, index: int) -> str:
        """The prompt of request ``index`` of a level. Documents are numbered by call, not
        by ``index``: each level (and the warm-up) restarts its indices, and a document
        seen at an earlier level would be served from the prefix cache."""
        if self.shared is not None:
            return f"{self.shared}\n\nQuestion {index}: {PROMPTS[index % len(PROMPTS)]}"
        return self.document(next(self._documents))

    def document(self, number: int) -> str:
        """Document ``number``: exactly ``input_tokens`` tokens, starting ``Document n.``."""
        assert self.input_tokens is not None
        n = self.input_tokens
        # A prime stride: consecutive requests start far apart in the corpus.
        start = (number * 7919) % (len(self.ids) - 2 * n)
        return exact_text(self.encode, self.decode, f"Document {number}.\n", self.ids[start:], n)
