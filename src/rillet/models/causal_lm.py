"""What every model class shares: loading HF-named tensors (fused on the way in), the
checkpoint's own integer codes, the tied LM head and the logits.

A model subclass builds its layers in ``__init__`` (``embed_tokens``, ``layers``, ``norm``,
``lm_head`` and its rotary tables), runs them in ``forward``, names the tensors a checkpoint
must have (``_expected_tensors``), and rebuilds its buffers after ``to_empty``
(``_init_buffers``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType
from typing import TypeVar

import torch
from torch import nn

from rillet.errors import ModelLoadError
from rillet.models.attention import AttentionMetadata, KVCache
from rillet.models.config import ModelConfig
from rillet.models.decoder_stack import DecoderStack
from rillet.models.gguf_codes import GroupCodes
from rillet.models.linear import Linear

M = TypeVar("M", bound="CausalLM")


class Embedding(nn.Embedding):
    """``nn.Embedding`` that draws no random weight on the meta device (``CausalLM.empty``):
    there ``normal_`` runs torch's Python reference, whose first call imports
    torch._dynamo, 2 s of every start, for values that are never kept."""

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            super().reset_parameters()


class CausalLM(nn.Module):
    """A decoder-only model: token ids -> final hidden states (``forward``) -> logits.

    ``decoder_stack`` (built by :meth:`build_decoder_stack` for the model runner, which owns
    the KV caches) takes the decode-only steps it covers in one native call, where a model
    has one; see ``models/decoder_stack.py``.
    """

    config: ModelConfig
    dtype: torch.dtype
    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    lm_head: Linear
    decoder_stack: DecoderStack | None = None

    @classmethod
    def empty(
        cls: type[M], config: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> M:
        """Allocate the model without initialising weights (``load_weights`` fills them all).

        Random init of 135M parameters took ~2 s of every start-up for values that are
        overwritten at once.
        """
        with torch.device("meta"):
            model = cls(config, dtype)
        # Memory of their own for the parameters, uninitialised. Not ``to_empty``: its
        # ``empty_like`` of a meta tensor runs torch's Python reference, whose first call
        # imports sympy (1 s of every start).
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    memory = torch.empty(param.shape, dtype=param.dtype, device=device)
                    module._parameters[name] = nn.Parameter(memory, param.requires_grad)
        # The rotary tables were made on the CPU even under meta (``rope.py``).
        if any(b.device != torch.device(device) for b in model.buffers()):
            model._init_buffers(device)
        # One Parameter each above: tie the LM head to the embedding again.
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model

    def _init_buffers(self, device: torch.device | str) -> None:
        """Recompute the buffers (rotary tables) on ``device``."""
        raise NotImplementedError

    def forward(
        self, input_ids: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        """A flat batch of token ids -> final hidden states [T, hidden]."""
        raise NotImplementedError

    def build_decoder_stack(
        self, kv_caches: list[KVCache], native: ModuleType | None
    ) -> DecoderStack | None:
        """The native decode-only stack, where this model has one (None: it has not)."""
        return None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states of the rows that sample -> fp32 logits [N, vocab]."""
        return self.lm_head.forward(hidden).float()

    def _fused_targets(self) -> dict[str, tuple[str, int, int]]:
        """HF projection name -> (fused module name, first row, rows)."""
        cfg = self.config
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return {
            "q_proj": ("qkv_proj", 0, q_size),
            "k_proj": ("qkv_proj", q_size, kv_size),
            "v_proj": ("qkv_proj", q_size + kv_size, kv_size),
            "gate_proj": ("gate_up_proj", 0, cfg.intermediate_size),
            "up_proj": ("gate_up_proj", cfg.intermediate_size, cfg.intermediate_size),
        }

    def _target(self, hf_name: str) -> tuple[str, tuple[int, int] | None]:
        """Where an HF-named tensor goes: our parameter name, and its (first row, rows) in a
        fused parameter (None: the whole parameter)."""
        parts = hf_name.removeprefix("model.").split(".")
        fused = self._fused_targets()
        if len(parts) >= 2 and parts[-2] in fused:
            fused_name, start, size = fused[parts[-2]]
            parts[-2] = fused_name
            return ".".join(parts), (start, size)
        return ".".join(parts), None

    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        skip: Callable[[str], bool] | None = None,
    ) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up. Raises ModelLoadError on a
        missing or misshapen tensor, so a broken checkpoint fails at start-up, not mid-request.
        ``skip``: the tensors the caller left out of ``weights`` on purpose (e.g.
        :meth:`codes_cover`), which are not missing.
        """
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        with torch.no_grad():
            for hf_name, tensor in weights:
                if "rotary_emb" in hf_name:
                    continue
                target, rows = self._target(hf_name)
                param = params.get(target)
                if param is None:
                    raise ModelLoadError(f"checkpoint has an unexpected tensor {hf_name!r}")
                dest = param.data if rows is None else param.data.narrow(0, *rows)
                if tuple(dest.shape) != tuple(tensor.shape):
                    raise ModelLoadError(
                        f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(dest.shape)}"
                    )
                dest.copy_(tensor)  # converts to the model's dtype on the way
                loaded.add(hf_name.removeprefix("model."))
        if skip is not None:
            loaded |= {name for name in self._expected_tensors() if skip(name)}
        self._check_complete(loaded)

    def load_group_codes(self, codes: Iterable[tuple[str, GroupCodes]]) -> int:
        """Give linear layers the checkpoint's own integers for their rows (``gguf_codes``),
        for their quantized copies to use; a tied embedding's go to the LM head. Returns how
        many tensors found a layer."""
        placed = 0
        for hf_name, group_codes in codes:
            target, rows = self._target(hf_name)
            if target == "embed_tokens.weight" and self.config.tie_word_embeddings:
                target = "lm_head.weight"
            module = self.get_submodule(target.removesuffix(".weight"))
            if isinstance(module, Linear):
                module.add_source_codes(0 if rows is None else rows[0], group_codes)
                placed += 1
        return placed

    def codes_cover(self, hf_name: str) -> bool:
        """Whether HF tensor ``hf_name``'s rows all have the checkpoint's own integer codes
        (:meth:`load_group_codes`) in a linear layer of their own (an LM head tied to the
        embedding shares its weight, whose floats the embedding reads): its float values
        are then only needed if that layer ends up without a quantized copy."""
        found = self.linear_for(hf_name)
        if found is None:
            return False
        module, (first, count) = found
        if not module.source_codes or module.weight is self.embed_tokens.weight:
            return False
        codes = module.source_codes.get(first)
        return codes is not None and codes.u.shape[0] == count

    def linear_for(self, hf_name: str) -> tuple[Linear, tuple[int, int]] | None:
        """The linear layer HF weight ``hf_name`` (with or without ``model.``) goes to, and
        its (first row, rows) there; None for a tensor of anything else."""
        target, rows = self._target(hf_name)
        if not target.endswith(".weight"):
            return None
        try:
            module = self.get_submodule(target.removesuffix(".weight"))
        except AttributeError:  # not ours: load_weights names it
            return None
        if not isinstance(module, Linear):
            return None
        return module, rows if rows is not None else (0, module.out_features)

    def _expected_tensors(self) -> set[str]:
        """Every tensor a checkpoint must have, under our (unfused) names."""
        raise NotImplementedError

    def _check_complete(self, loaded: set[str]) -> None:
        expected = self._expected_tensors()
        missing = sorted(expected - loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors: {shown}")
