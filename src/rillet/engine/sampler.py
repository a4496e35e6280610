"""Logits -> token ids for a whole batch, in tensor ops.

One call per engine step, one row per request that samples this step. The pipeline is
penalties (repetition, frequency, presence) -> suppression -> greedy argmax, and for sampled
rows temperature -> top-k -> top-p -> typical-p -> min-p -> draw. Each stage runs only when
some row needs it, so the common all-greedy / all-default step is an argmax.

Reported logprobs are those of the model's *raw* distribution (log-softmax of the logits
before penalties, temperature and filters), as vLLM's default ``raw_logprobs`` and close to
what TGI reports: they say what the model believed, independent of how we then chose.
The one exception is a grammar: a constrained row's tokens are masked first (disallowed
ones are -inf), and its logprobs are those of the *constrained* distribution, renormalized
over the tokens the grammar allowed; it is the only distribution the output came from.

Seeded rows are batch invariant: every sampled row draws its own V uniforms per step from
its own generator (``argmax(p / q)`` with ``q = -log U ~ Exp(1)`` samples from ``p``), so a
request's draws never depend on its neighbours. Unseeded rows share the sampler's generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import cast

import numpy as np
import torch

from rillet.engine.grammar import TokenBitmask, apply_token_bitmask
from rillet.protocol import TopLogprob
from rillet.sampling import SamplingParams

#: Temperatures below this sample as greedy: dividing by them would overflow float32, and the
#: distribution is argmax in all but name (vLLM draws the same line).
MIN_TEMPERATURE = 1e-5
_NEG_INF = float("-inf")
#: Prompt logprobs are computed in chunks of rows so a long prompt never needs a full float32
#: [P, V] copy at once.
_PROMPT_CHUNK = 256


@dataclass
class SamplingRow:
    """What the sampler needs to know about one request for this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    #: Per-request generator seeded from ``params.seed``; None -> the sampler's shared one.
    generator: torch.Generator | None = None
    #: Ids forbidden this step (EOS / stop ids while fewer than ``min_tokens`` were produced).
    suppress_token_ids: frozenset[int] | tuple[int, ...] = ()


@dataclass
class SamplerOutput:
    """One step's choices, in row order."""

    token_ids: list[int]
    #: Raw-distribution logprob of each sampled token; None when no row asked for logprobs.
    logprobs: list[float] | None = None
    #: Per row, its ``top_logprobs`` most likely tokens (descending); [] for rows that did
    #: not ask; None when no row asked.
    top_logprobs: list[list[TopLogprob]] | None = None


def _is_sampled(params: SamplingParams) -> bool:
    return params.temperature >= MIN_TEMPERATURE


def _unique_ids(
    rows: Sequence[int], id_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct (row, token id) pairs with their counts; ids outside [0, V) are dropped.

    Penalties touch only these entries, so their cost follows the number of ids, not B x V.
    """
    lengths = torch.tensor([len(ids) for ids in id_lists], dtype=torch.long, device=device)
    row_idx = torch.tensor(rows, dtype=torch.long, device=device).repeat_interleave(lengths)
    tok_idx = torch.tensor([t for ids in id_lists for t in ids], dtype=torch.long, device=device)
    # Stop ids come from clients; a bad one must not crash the step, so it is ignored.
    valid = (tok_idx >= 0) & (tok_idx < vocab_size)
    keys, counts = torch.unique(row_idx[valid] * vocab_size + tok_idx[valid], return_counts=True)
    return keys // vocab_size, keys % vocab_size, counts


def _row_tensor(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def penalized_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Float32 ``logits`` [B, V] with penalties and suppression applied.

    A copy when anything applies; otherwise ``logits`` itself (when already float32), which
    callers must not modify. Skipping the copy matters: at 64 rows it is 12 MB a step.
    """
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    additive = [
        i
        for i, r in enumerate(rows)
        if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0
    ]
    supp = [i for i, r in enumerate(rows) if r.suppress_token_ids]
    if not (rep or additive or supp):
        return logits.float()
    x = logits.to(torch.float32, copy=True)
    vocab, dev = x.shape[1], x.device
    if rep:
        # HF semantics: every id seen in prompt or output, once, regardless of count.
        ids = [rows[i].prompt_token_ids + rows[i].output_token_ids for i in rep]
        r_idx, t_idx, _ = _unique_ids(rep, ids, vocab, dev)
        penalty = _row_tensor([r.params.repetition_penalty for r in rows], dev).squeeze(1)[r_idx]
        seen = x[r_idx, t_idx]
        x[r_idx, t_idx] = torch.where(seen > 0, seen / penalty, seen * penalty)
    if additive:
        # OpenAI semantics: over generated ids only, by count (frequency) and once (presence).
        ids = [rows[i].output_token_ids for i in additive]
        r_idx, t_idx, counts = _unique_ids(additive, ids, vocab, dev)
        freq = _row_tensor([r.params.frequency_penalty for r in rows], dev).squeeze(1)[r_idx]
        presence = _row_tensor([r.params.presence_penalty for r in rows], dev).squeeze(1)[r_idx]
        x[r_idx, t_idx] -= freq * counts.to(torch.float32) + presence
    if supp:
        ids = [list(rows[i].suppress_token_ids) for i in supp]
        r_idx, t_idx, _ = _unique_ids(supp, ids, vocab, dev)
        kept = x[r_idx, t_idx]
        x[r_idx, t_idx] = _NEG_INF
        # Suppressing every finite token would leave nothing to sample: give such a row its
        # logits back rather than produce NaNs (it cannot happen with EOS-only suppression).
        supp_idx = torch.tensor(supp, dtype=torch.long, device=dev)
        empty = torch.zeros(x.shape[0], dtype=torch.bool, device=dev)
        empty[supp_idx] = torch.isneginf(x.index_select(0, supp_idx).amax(dim=1))
        restore = empty[r_idx]
        if bool(restore.any()):
            x[r_idx[restore], t_idx[restore]] = kept[restore]
    return x


def filter_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p, typical-p and min-p, on float32 ``logits`` [N, V].

    Returns a new tensor where removed tokens are -inf. Every filter keeps at least one
    finite token: top-k, top-p and min-p always keep the most likely one, typical-p keeps its
    most typical one (HF's TypicalLogitsWarper semantics, which may drop the argmax).
    """
    vocab = logits.shape[1]
    dev = logits.device
    fmax = torch.finfo(torch.float32).max
    # Clamp so a huge temperature gives ~0 (uniform over finite tokens), never -inf/inf = NaN.
    temps = _row_tensor([p.temperature for p in params], dev).clamp_(MIN_TEMPERATURE, fmax)
    x = logits / temps

    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        k_max = max(ks)
        top_vals = x.topk(k_max, dim=1).values
        k_t = torch.tensor(ks, dtype=torch.long, device=dev).unsqueeze(1)
        threshold = top_vals.gather(1, (k_t - 1).clamp_(min=0))
        threshold.masked_fill_(k_t == 0, _NEG_INF)
        # `<` keeps ties with the k-th value, as HF's TopKLogitsWarper does.
        x = x.masked_fill(x < threshold, _NEG_INF)

    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        idx = torch.tensor(nucleus, dtype=torch.long, device=dev)
        top_p = _row_tensor([params[i].top_p for i in nucleus], dev)
        rows = x.index_select(0, idx)
        x[idx] = rows.masked_fill(rows < _top_p_bound(rows, top_p), _NEG_INF)

    typical = [i for i, p in enumerate(params) if p.typical_p < 1.0]
    if typical:
        idx = torch.tensor(typical, dtype=torch.long, device=dev)
        mass = _row_tensor([params[i].typical_p for i in typical], dev)
        x[idx] = _typical_filter(x[idx], mass)

    if any(p.min_p > 0.0 for p in params):
        # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p): no softmax needed, and
        # min_p = 0 gives a -inf bound that keeps everything.
        log_min_p = _row_tensor([p.min_p for p in params], dev).log()
        bound = x.amax(dim=1, keepdim=True) + log_min_p
        x = x.masked_fill(x < bound, _NEG_INF)
    return x


def _sorted_desc(x: torch.Tensor) -> torch.Tensor:
    """Each row's values, descending. On CPU numpy's SIMD sort of values alone is ~25x faster
    than ``torch.sort`` (2.5 ms vs 60+ ms for 16 x 49k), and we never need the indices."""
    if x.device.type == "cpu":
        return torch.from_numpy(-np.sort(-x.numpy(), axis=1))
    return x.sort(dim=1, descending=True).values


def _argsort(x: torch.Tensor) -> torch.Tensor:
    """Ascending argsort of each row (numpy on CPU: ~8x faster than ``torch.sort``)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.argsort(x.numpy(), axis=1))
    return x.argsort(dim=1)


def _top_p_bound(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest logit of the nucleus: the most likely tokens whose mass before
    them is < top_p (so the one that crosses top_p is kept, as in HF's TopPLogitsWarper)."""
    sorted_x = _sorted_desc(x)
    cum = (sorted_x - x.logsumexp(dim=1, keepdim=True)).exp_().cumsum_(dim=1)
    mass_before = torch.nn.functional.pad(cum[:, :-1], (1, 0))  # exact and non-decreasing
    # The first token is always kept, so rounding with a tiny top_p cannot empty a row.
    size = (mass_before < top_p).sum(dim=1, keepdim=True).clamp_(min=1)
    return sorted_x.gather(1, size - 1)


def _typical_filter(x: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al.): keep the tokens whose surprisal is closest
    to the entropy, up to ``mass`` of probability."""
    logp = x.log_softmax(dim=1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=1, keepdim=True)
    distance = (-logp - entropy).abs()  # -inf tokens get +inf: they sort last
    order = _argsort(distance)
    cum = p.gather(1, order).cumsum(dim=1)
    last = (cum < mass).sum(dim=1, keepdim=True).clamp_(max=x.shape[1] - 1)
    return x.masked_fill(distance > distance.gather(1, order.gather(1, last)), _NEG_INF)


class Sampler:
    """Chooses the next token of every row; stateless apart from the shared generator."""

    def __init__(
        self,
        device: torch.device | str = "cpu",
        seed: int | None = None,
        native: ModuleType | None = None,
    ) -> None:
        """``native``: the compiled CPU kernels (``cpu_kernels.load()``), for grammar masks."""
        self.device = torch.device(device)
        self.native = native
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    @staticmethod
    def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
        """A generator for one request's draws, or None (use the shared one) without a seed."""
        if seed is None:
            return None
        return torch.Generator(device=torch.device(device)).manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow], allowed: TokenBitmask | None = None
    ) -> SamplerOutput:
        """Pick one token per row of ``logits`` [B, V] (any float dtype).

        ``allowed`` restricts its rows to the tokens it allows, before anything else (so
        penalties, filters and logprobs all see the constrained distribution). Masking
        writes into ``logits`` when they are float32 (the runner's are a fresh tensor).
        """
        params = [r.params for r in rows]
        if allowed is not None and allowed.rows:
            picked = self._masked_greedy(logits, rows, allowed)
            if picked is not None:
                return SamplerOutput(token_ids=picked)
            logits = logits.float()
            apply_token_bitmask(logits, allowed, self.native)
        want_lp = any(p.logprobs or p.top_logprobs > 0 for p in params)
        out = SamplerOutput(token_ids=[])
        if want_lp:
            log_z = torch.logsumexp(logits.float(), dim=1)
            if any(p.top_logprobs > 0 for p in params):
                out.top_logprobs = self._top_logprobs(logits, log_z, params)

        x = penalized_logits(logits, rows)
        sampled = [i for i, p in enumerate(params) if _is_sampled(p)]
        generators = [rows[i].generator for i in sampled]
        if len(sampled) == len(rows) > 0:  # the whole batch samples: no gather / scatter
            token_ids = self._draw(filter_logits(x, params), generators)
        else:
            token_ids = x.argmax(dim=1)  # greedy: exactly argmax, ties to the lowest id
        if 0 < len(sampled) < len(rows):
            idx = torch.tensor(sampled, dtype=torch.long, device=x.device)
            filtered = filter_logits(x[idx], [params[i] for i in sampled])
            token_ids[idx] = self._draw(filtered, generators)

        out.token_ids = token_ids.tolist()
        if want_lp:
            chosen = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1).float()
            out.logprobs = (chosen - log_z).tolist()
        return out

    def _masked_greedy(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], allowed: TokenBitmask
    ) -> list[int] | None:
        """Every row's token when the whole step is plain greedy (no sampled row, no
        penalty or suppression, no logprobs) on the CPU kernels: the masked rows' argmax read
        through the mask (``masked_argmax``), not written to -inf first and then read again.
        None when the step needs the general path.

        At 16 masked rows of SmolLM2's 49k tokens the write and the second read were
        ~0.3 ms of a ~23 ms served step (bench/RESULTS.md, issue 28 at c = 16).
        """
        native = self.native
        if native is None or logits.device.type != "cpu" or logits.dtype != torch.float32:
            return None
        for r in rows:
            p = r.params
            if (
                _is_sampled(p)
                or p.logprobs
                or p.top_logprobs > 0
                or r.suppress_token_ids
                or p.repetition_penalty != 1.0
                or p.frequency_penalty != 0.0
                or p.presence_penalty != 0.0
            ):
                return None
        index = allowed.row_index
        if index is None:
            index = torch.tensor(allowed.rows, dtype=torch.int64)
        logits = logits.contiguous()
        masked = native.masked_argmax(logits, allowed.bits.contiguous(), index).tolist()
        if len(allowed.rows) == len(rows):
            token_ids = [0] * len(rows)
        else:  # the unconstrained rows: exactly argmax, as the general path
            token_ids = logits.argmax(dim=1).tolist()
        for row, token_id in zip(allowed.rows, masked, strict=True):
            token_ids[row] = token_id
        return cast(list[int], token_ids)

    def _draw(
        self, filtered: torch.Tensor, generators: Sequence[torch.Generator | None]
    ) -> torch.Tensor:
        probs = filtered.softmax(dim=1)
        uniform = torch.empty_like(probs)
        shared = [j for j, g in enumerate(generators) if g is None]
        if len(shared) == len(generators):
            uniform.uniform_(generator=self.generator)
        elif shared:
            idx = torch.tensor(shared, dtype=torch.long, device=probs.device)
            uniform[idx] = uniform[idx].uniform_(generator=self.generator)
        for j, g in enumerate(generators):
            if g is not None:
                # Exactly V draws per step from the row's own generator: batch invariant.
                uniform[j].uniform_(generator=g)
        # -log(U) ~ Exp(1), and argmax(p / Exp(1)) samples from p (the exponential race).
        # uniform_ is ~7x cheaper than exponential_ on CPU. U == 0 gives +inf: p / inf = 0,
        # that token simply cannot win.
        race = uniform.log_().neg_()
        return (probs / race).argmax(dim=1)

    @staticmethod
    def _top_logprobs(
        logits: torch.Tensor, log_z: torch.Tensor, params: Sequence[SamplingParams]
    ) -> list[list[TopLogprob]]:
        result: list[list[TopLogprob]] = [[] for _ in params]
        asking = [i for i, p in enumerate(params) if p.top_logprobs > 0]
        n_max = min(max(params[i].top_logprobs for i in asking), logits.shape[1])
        idx = torch.tensor(asking, dtype=torch.long, device=logits.device)
        values, ids = logits[idx].float().topk(n_max, dim=1)
        values -= log_z[idx].unsqueeze(1)
        for j, i in enumerate(asking):
            n = params[i].top_logprobs
            pairs = zip(ids[j, :n].tolist(), values[j, :n].tolist(), strict=True)
            # A grammar may allow fewer than n tokens: the rest are impossible, not listed.
            result[i] = [TopLogprob(token_id=t, logprob=lp) for t, lp in pairs if lp != _NEG_INF]
        return result

    def prompt_logprobs_for(self, logits: torch.Tensor, target_ids: Sequence[int]) -> list[float]:
        """Logprob of ``target_ids[i]`` under the raw distribution of ``logits[i]`` ([N, V])."""
        if logits.shape[0] < len(target_ids):
            raise ValueError(f"{len(target_ids)} targets but only {logits.shape[0]} logit rows")
        result: list[float] = []
        for start in range(0, len(target_ids), _PROMPT_CHUNK):
            chunk = logits[start : start + _PROMPT_CHUNK].float()
            targets = torch.tensor(
                target_ids[start : start + _PROMPT_CHUNK], dtype=torch.long, device=logits.device
            )
            rows = chunk[: targets.shape[0]]
            chosen = rows.gather(1, targets.unsqueeze(1)).squeeze(1)
            result.extend((chosen - torch.logsumexp(rows, dim=1)).tolist())
        return result

    def prompt_logprobs(
        self, logits: torch.Tensor, prompt_token_ids: list[int]
    ) -> list[float | None]:
        """Per prompt token, its logprob given the tokens before it; ``None`` for the first.

        ``logits`` [P, V] (or [P - 1, V]) holds the model's output at each prompt position:
        row ``i`` predicts token ``i + 1``, so the last row (if present) is unused.
        """
        if not prompt_token_ids:
            return []
        tail = self.prompt_logprobs_for(logits, prompt_token_ids[1:])
        return [None, *tail]
