"""Text <-> token ids, and the model's chat template.

:class:`Tokenizer` wraps a ``tokenizers.Tokenizer`` (the Rust fast tokenizer HF ships as
``tokenizer.json``) and adds what a server needs around it: BOS/EOS ids, which ids are special,
and the model's chat template (rendered by :mod:`rillet.chat_template`). It is built from an
HF folder or from GGUF metadata (see :mod:`rillet.tokenizer_gguf`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from rillet.chat_template import CHATML_TEMPLATE, GEMMA_TEMPLATE, ChatTemplate
from rillet.errors import ModelLoadError, ValidationError
from rillet.jsonfile import read_json_object
from rillet.tokenizer_gguf import build_gguf_backend

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """A model's tokenizer plus the facts around it.

    ``encode`` adds BOS when the tokenizer's post-processor does (``add_bos``); text rendered by
    :meth:`apply_chat_template` usually already carries its BOS, so encode it with
    ``add_special_tokens=False``, as transformers does.

    When the model has no chat template, :meth:`apply_chat_template` falls back to ChatML
    (:data:`CHATML_TEMPLATE`) instead of refusing, so chat endpoints work on base and test
    models; ``has_chat_template`` tells the two cases apart for logging.
    """

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids: frozenset[int] = frozenset(int(i) for i in eos_token_ids)
        self.special_ids: frozenset[int] = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.add_bos: bool = bos_token_id is not None and backend.encode(
            "", add_special_tokens=True
        ).ids[:1] == [bos_token_id]
        self.has_chat_template = chat_template is not None
        self.chat_template: str = chat_template if chat_template is not None else CHATML_TEMPLATE
        if special_tokens is None:  # nothing named: derive the template's names from the ids
            special_tokens = {
                "bos_token": None if bos_token_id is None else backend.id_to_token(bos_token_id),
                "eos_token": backend.id_to_token(min(self.eos_token_ids))
                if self.eos_token_ids
                else None,
            }
        #: The names templates see (``bos_token``, ``eos_token``, ...), None ones left out.
        self.special_tokens: dict[str, str] = {
            k: v for k, v in special_tokens.items() if v is not None
        }
        self._template = ChatTemplate(self.chat_template)

    # --- ids ---------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special-token strings in it (``<|im_end|>``) become their ids."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Not UTF-8 safe for partial sequences: use the detokenizer to stream."""
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_piece(self, token_id: int) -> str:
        """The raw vocabulary string of ``token_id`` (e.g. ``"Ġhello"``, ``"<0x0A>"``)."""
        piece = self.backend.id_to_token(int(token_id))
        if piece is None:
            raise ValidationError(f"token id {token_id} is outside the vocabulary")
        return str(piece)

    def is_special(self, token_id: int) -> bool:
        """True for control tokens such as ``<|im_end|>``, which decode skips by default."""
        return token_id in self.special_ids

    # --- chat ----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render ``messages`` with the model's chat template, as transformers would.

        ``content`` may be a string or a list of ``{"type": "text", "text": ...}`` parts
        (joined with no separator). ``extra`` reaches the template as variables (``tools``,
        ``documents``, ...) and overrides ``bos_token`` & co. Any failure is a ValidationError.
        """
        variables = {**self.special_tokens, **extra}
        return self._template.render(messages, add_generation_prompt, variables)

    # --- constructors --------------------------------------------------------------------------

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` + ``tokenizer_config.json`` (+ EOS ids from ``config.json``
        and ``generation_config.json``) from an HF model folder."""
        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise ModelLoadError(
                f"{folder} has no tokenizer.json (rillet needs the fast tokenizer file; "
                "SentencePiece-only tokenizer.model folders are not supported)"
            )
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises plain Exception on a bad file
            raise ModelLoadError(f"cannot read {file}: {exc}") from exc
        cfg = read_json_object(folder / "tokenizer_config.json")
        names = {name: _token_content(cfg.get(name)) for name in _SPECIAL_NAMES}
        model_cfg = read_json_object(folder / "config.json")
        bos_id = _token_id(backend, names["bos_token"])
        if bos_id is None and isinstance(model_cfg.get("bos_token_id"), int):
            bos_id = model_cfg["bos_token_id"]
        eos_ids: set[int] = set()
        eos_id = _token_id(backend, names["eos_token"])
        if eos_id is not None:
            eos_ids.add(eos_id)
        for extra in (model_cfg, read_json_object(folder / "generation_config.json")):
            eos_ids.update(_id_list(extra.get("eos_token_id")))
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            chat_template=_hf_chat_template(folder, cfg),
            special_tokens=names,
        )

    @classmethod
    def from_gguf(cls, reader_or_fields: Any) -> Tokenizer:
        """Build from a ``gguf.GGUFReader`` or a mapping of GGUF metadata keys to plain values."""
        meta = _gguf_metadata(reader_or_fields)
        backend = build_gguf_backend(meta)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos_ids = _id_list(meta.get("tokenizer.ggml.eos_token_id"))
        # llama.cpp also stops on end-of-turn / end-of-message tokens when a file names them.
        eos_ids += _id_list(meta.get("tokenizer.ggml.eot_token_id"))
        eos_ids += _id_list(meta.get("tokenizer.ggml.eom_token_id"))
        tokens: Sequence[str] = meta["tokenizer.ggml.tokens"]
        names: dict[str, str | None] = {}
        for name, key in zip(_SPECIAL_NAMES, ("bos", "eos", "unknown", "padding"), strict=True):
            tid = meta.get(f"tokenizer.ggml.{key}_token_id")
            names[name] = tokens[int(tid)] if tid is not None and 0 <= tid < len(tokens) else None
        template = meta.get("tokenizer.chat_template")
        turn_end = backend.token_to_id("<end_of_turn>")
        if turn_end is not None and backend.token_to_id("<start_of_turn>") is not None:
            # Gemma: llama.cpp ends a generation at <end_of_turn> too (its end-of-generation
            # tokens), and a file without a template gets Gemma's turns, not ChatML.
            eos_ids.append(turn_end)
            template = template or GEMMA_TEMPLATE
        return cls(
            backend,
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=eos_ids,
            chat_template=str(template) if template else None,
            special_tokens=names,
        )


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores a special token as a string or as a serialized AddedToken."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _token_id(backend: HFTokenizer, token: str | None) -> int | None:
    return None if token is None else backend.token_to_id(token)


def _id_list(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _hf_chat_template(folder: Path, cfg: Mapping[str, Any]) -> str | None:
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = read_json_object(folder / "chat_template.json").get("chat_template")
    return template if isinstance(template, str) else None


def _gguf_metadata(reader_or_fields: Any) -> Mapping[str, Any]:
    fields = getattr(reader_or_fields, "fields", None)
    if fields is None:
        if not isinstance(reader_or_fields, Mapping):
            raise TypeError("expected a gguf.GGUFReader or a mapping of metadata values")
        return reader_or_fields
    return {key: field.contents() for key, field in fields.items() if key.startswith("tokenizer.")}
