"""Grammar libraries for constrained decoding, measured on a model's real vocabulary.

For xgrammar, llguidance and (optionally) outlines-core, on the vocabulary of each model
given: the time to build the library's tokenizer view; per constraint (three JSON schemas of
growing size, ``json_object`` and a regex) the compile time, and the per-token cost of
decoding a valid document under it (fill the next-token bitmask, check the document's own
next token is allowed, advance), averaged over the document's tokens; and resident memory.

    .venv/bin/python bench/grammar_libraries.py                      # the bundled SmolLM2
    .venv/bin/python bench/grammar_libraries.py ~/.cache/rillet/models/qwen2.5-coder-1.5b
    .venv/bin/python bench/grammar_libraries.py MODEL --outlines     # + outlines-core (slow)

Each number is the median of ``--repeat`` runs (3). The document is tokenized the way the
model's tokenizer encodes it, so the walk is a realistic (not adversarial) path. Compile
times are cold: each library's compiler cache is cleared (xgrammar) or not kept
(llguidance compiles lazily, in the matcher, so its "compile" is the matcher's creation and
its cost moves into the first masks).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from rillet.models.loader import load_model_files
from rillet.tokenizer import Tokenizer

SMALL = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "orders": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "qty": {"type": "integer", "minimum": 1},
                    "price": {"type": "number"},
                    "status": {"enum": ["open", "shipped", "returned"]},
                },
                "required": ["sku", "qty", "price", "status"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["id", "role", "address", "tags", "orders"],
    "additionalProperties": False,
}
_WIDE_TYPES = [{"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}]
WIDE = {
    "type": "object",
    "properties": {f"field_{i:02d}": _WIDE_TYPES[i % 4] for i in range(50)},
    "required": [f"field_{i:02d}" for i in range(50)],
    "additionalProperties": False,
}
REGEX = r"(19|20)\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01]) [A-Z][a-z]+ [A-Z]{2} \d{3}-\d{4}"

DOCS: dict[str, Any] = {
    "small": {"name": "Ada Lovelace", "age": 36},
    "nested": {
        "id": 4021,
        "role": "editor",
        "address": {"street": "12 Analytical Row", "city": "London", "zip": "02139"},
        "tags": ["math", "engines", "poetry"],
        "orders": [
            {"sku": "BAB-001", "qty": 2, "price": 19.99, "status": "shipped"},
            {"sku": "NOTE-G", "qty": 1, "price": 4.5, "status": "open"},
        ],
    },
    "wide": {f"field_{i:02d}": [f"value {i}", i * 7, i / 4, i % 2 == 0][i % 4] for i in range(50)},
    "json_object": {"answer": "forty-two", "steps": [1, 2, 3], "ok": True, "note": None},
}
CASES: list[tuple[str, str, Any, str]] = [
    ("small", "json_schema", SMALL, json.dumps(DOCS["small"])),
    ("nested", "json_schema", NESTED, json.dumps(DOCS["nested"])),
    ("wide (50 props)", "json_schema", WIDE, json.dumps(DOCS["wide"])),
    ("json_object", "json_object", None, json.dumps(DOCS["json_object"])),
    ("regex", "regex", REGEX, "2024-02-29 Boston MA 555-0199"),
]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * 4096 / 2**20


def allowed(bits: Any, token_id: int) -> bool:
    return bool((int(bits[0, token_id // 32]) >> (token_id % 32)) & 1)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


# ---- xgrammar --------------------------------------------------------------------------


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: Tokenizer) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_size = tok.vocab_size
        self.eos = sorted(tok.eos_token_ids)
        self.backend_json = tok.backend.to_str()
        self.vocab = [tok.backend.id_to_token(i) or "" for i in range(tok.vocab_size)]

    def build_tokenizer(self) -> None:
        xgr = self.xgr
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(self.backend_json)
        info = xgr.TokenizerInfo(
            self.vocab,
            meta["vocab_type"],
            vocab_size=self.vocab_size,
            stop_token_ids=self.eos,
            add_prefix_space=meta["add_prefix_space"],
        )
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def compile(self, kind: str, value: Any) -> Any:
        c = self.compiler
        if kind == "json_schema":
            return c.compile_json_schema(json.dumps(value), any_whitespace=False)
        if kind == "json_object":
            return c.compile_builtin_json_grammar()
        return c.compile_regex(value)

    def walk(self, compiled: Any, ids: list[int]) -> float:
        matcher = self.xgr.GrammarMatcher(compiled)
        mask = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        bits = mask.numpy()  # a view: reading it costs ~0.1 us, a torch index ~2 us
        start = time.perf_counter()
        for t in ids:
            matcher.fill_next_token_bitmask(mask, 0)
            assert allowed(bits, t), f"token {t} refused"
            assert matcher.accept_token(t)
        matcher.fill_next_token_bitmask(mask, 0)
        elapsed = time.perf_counter() - start
        assert allowed(bits, self.eos[0]), "EOS refused"
        return elapsed


#: The same output format as xgrammar's ``any_whitespace=False``: json.dumps' separators.
_LLG_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# ---- llguidance ------------------------------------------------------------------------


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: Tokenizer) -> None:
        import llguidance

        self.llg = llguidance
        self.vocab_size = tok.vocab_size
        self.eos = sorted(tok.eos_token_ids)
        self.backend_json = tok.backend.to_str()

    def build_tokenizer(self) -> None:
        self.tokenizer = self.llg.LLTokenizer(
            self.backend_json, n_vocab=self.vocab_size, eos_token=self.eos
        )

    def compile(self, kind: str, value: Any) -> Any:
        M = self.llg.LLMatcher
        if kind == "json_schema":
            grammar = M.grammar_from_json_schema(value, _LLG_JSON)
        elif kind == "json_object":
            grammar = M.grammar_from_json_schema({"type": "object"}, _LLG_JSON)
        else:
            grammar = M.grammar_from_regex(value)
        matcher = M(self.tokenizer, grammar)  # grammar construction happens here
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def walk(self, grammar: Any, ids: list[int]) -> float:
        import llguidance.torch as llt

        matcher = self.llg.LLMatcher(self.tokenizer, grammar)
        mask = llt.allocate_token_bitmask(1, self.vocab_size)
        bits = mask.numpy()  # a view: reading it costs ~0.1 us, a torch index ~2 us
        start = time.perf_counter()
        for t in ids:
            llt.fill_next_token_bitmask(matcher, mask, 0)
            assert allowed(bits, t), f"token {t} refused"
            assert matcher.consume_token(t), matcher.get_error()
        llt.fill_next_token_bitmask(matcher, mask, 0)
        elapsed = time.perf_counter() - start
        assert allowed(bits, self.eos[0]), "EOS refused"
        return elapsed


# ---- outlines-core ---------------------------------------------------------------------


class OutlinesCore:
    """outlines-core compiles a regex (a JSON schema becomes one) into a full token index."""

    name = "outlines-core"

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.vocab_size = tok.vocab_size

    def build_tokenizer(self) -> None:
        from outlines_core import Vocabulary

        from rillet.tokenizer_gguf import _byte_to_unicode

        # outlines-core takes each token's bytes (it does not undo the byte-level alphabet).
        to_byte = {c: b for b, c in _byte_to_unicode().items()}
        eos = min(self.tok.eos_token_ids)
        by_token: dict[bytes, list[int]] = {}
        for i in range(self.vocab_size):
            piece = self.tok.backend.id_to_token(i)
            if piece is None or i in self.tok.eos_token_ids:
                continue
            raw = bytes(to_byte[c] for c in piece) if all(c in to_byte for c in piece) else None
            by_token.setdefault(raw or piece.encode(), []).append(i)
        self.vocabulary = Vocabulary(eos, by_token)

    def compile(self, kind: str, value: Any) -> Any:
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        if kind == "json_schema":
            regex = build_regex_from_schema(json.dumps(value))
        elif kind == "json_object":
            raise NotImplementedError("no generic JSON grammar (regex only)")
        else:
            regex = value
        return Index(regex, self.vocabulary)

    def walk(self, index: Any, ids: list[int]) -> float:
        from outlines_core import Guide

        guide = Guide(index)
        mask = torch.full((1, (self.vocab_size + 31) // 32), 0, dtype=torch.int32)
        bits = mask.numpy()  # a view: reading it costs ~0.1 us, a torch index ~2 us
        start = time.perf_counter()
        for t in ids:
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            assert allowed(bits, t), f"token {t} refused"
            guide.advance(t)
        return time.perf_counter() - start


def measure(lib: Any, tok: Tokenizer, repeat: int) -> None:
    rss0 = rss_mib()
    build = statistics.median(timed(lib.build_tokenizer)[0] for _ in range(repeat))
    rss1 = rss_mib()
    print(f"\n{lib.name}: tokenizer view {build * 1e3:.0f} ms, RSS +{rss1 - rss0:.0f} MiB")
    print(f"  {'constraint':<16} {'compile ms':>10} {'tokens':>6} {'us/token':>9} {'RSS +MiB':>8}")
    for label, kind, value, doc in CASES:
        ids = tok.encode(doc, add_special_tokens=False)
        try:
            compiled, compile_s, grown = compile_case(lib, kind, value, repeat)
        except NotImplementedError as exc:
            print(f"  {label:<16} n/a ({exc})")
            continue
        walk_s = statistics.median(lib.walk(compiled, ids) for _ in range(repeat))
        per_token = walk_s / (len(ids) + 1) * 1e6
        print(
            f"  {label:<16} {compile_s * 1e3:>10.1f} {len(ids):>6} {per_token:>9.1f} {grown:>8.1f}"
        )
        del compiled
        gc.collect()


def compile_case(lib: Any, kind: str, value: Any, repeat: int) -> tuple[Any, float, float]:
    """The compiled constraint, the median compile time and the RSS the first one added."""
    before = rss_mib()
    times = []
    compiled = None
    for _ in range(repeat):
        seconds, compiled = timed(lambda: lib.compile(kind, value))
        times.append(seconds)
    return compiled, statistics.median(times), rss_mib() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="GGUF or HF folder (bundled)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--outlines", action="store_true", help="also outlines-core (slow)")
    parser.add_argument("--only", choices=["xgrammar", "llguidance", "outlines-core"])
    args = parser.parse_args()
    tok = load_model_files(args.model).tokenizer
    torch.set_num_threads(2)
    print(f"vocabulary: {tok.vocab_size} tokens; repeat {args.repeat}, medians")
    libs: list[type] = [XGrammar, LLGuidance] + ([OutlinesCore] if args.outlines else [])
    for cls in libs:
        if args.only is None or args.only == cls.name:
            measure(cls(tok), tok, args.repeat)


if __name__ == "__main__":
    main()
