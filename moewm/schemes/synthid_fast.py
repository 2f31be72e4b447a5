"""SynthID-Text's generation-time processor, computed from a per-key table: the same scores as transformers', fast.

transformers' ``SynthIDTextWatermarkLogitsProcessor`` hashes every (context, continuation, layer) triple at
every step: B x V x depth int64 hashes, a modulo and a gather (``_compute_keys``, ``sample_g_values``), then
tilts the distribution layer by layer from a (B, V, depth) int64 tensor (``update_scores``). Correct, and
~16x slower than plain sampling on a small model (``docs/synthid_fast.md``).

The shortcut. transformers' g-value of continuation v after a context with accumulated hash h0 is, in int64
arithmetic that wraps, ``table[((((h0 + v) * M + 1) + k_l) * M + 1) % S]`` (M the LCG multiplier, k_l layer
l's key, S the sampling-table size). torch's ``%`` with a positive divisor is a floor modulo, so for
S = 2**b it keeps the low b bits of the two's-complement hash; the low b bits of a wrapped sum or product
depend only on the low b bits of its operands. So ``g_l(v) = G[l, (h0 + v) mod S]`` for a table G of shape
(depth, S) built once per key set: the whole vocabulary's g-values for one context are a (wrapping)
contiguous slice of G, one gather per layer and step. For a table size that is not a power of two the
shortcut does not hold and :class:`FastSynthIDTextWatermarkingConfig` builds transformers' own processor.

The tilt does transformers' float operations in transformers' order on the same values (g is 0 or 1, so
``g * p`` and ``1 + g`` are exact in any float type), only from a contiguous layer-major g and into reused
buffers, so the output scores are bit-identical; ``tests/test_synthid_fast.py`` checks scores and generated
ids against transformers. Detection (``compute_g_values``) is inherited unchanged.

The processor reaches ``generate`` through :class:`FastSynthIDTextWatermarkingConfig` (``watermarking_config=``),
so transformers puts it where it puts its own: after every other processor and the temperature / top-k /
top-p warpers (``GenerationMixin._get_logits_processor``).
"""

from __future__ import annotations

import torch
from transformers import SynthIDTextWatermarkingConfig
from transformers.generation.logits_process import SynthIDTextWatermarkLogitsProcessor


class FastSynthIDTextWatermarkLogitsProcessor(SynthIDTextWatermarkLogitsProcessor):
    """transformers' SynthID processor with the per-step hashing replaced by a lookup in a (depth, S) g table
    (module docstring); same state, same output scores. Needs a power-of-two ``sampling_table_size``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        size = self.sampling_table.numel()
        if size & (size - 1):
            raise ValueError(f"sampling_table_size={size}: the g table needs a power of two (use transformers' processor)")
        residues = torch.arange(size, device=self.device)  # u = (h0 + v) mod S
        after_token = self.accumulate_hash(torch.zeros_like(residues), residues[:, None])  # hash of h0 + v = u
        per_layer = self.accumulate_hash(after_token[None, :], self.keys[:, None, None])  # (depth, S), as _compute_keys
        self.g_table = self.sampling_table[per_layer % size]  # (depth, S), as sample_g_values
        self._float_tables: dict[torch.dtype, torch.Tensor] = {}

    def _table(self, dtype: torch.dtype) -> torch.Tensor:
        """The g table in ``dtype`` (0 and 1 are exact in every float type), built once per dtype."""
        table = self._float_tables.get(dtype)
        if table is None:
            table = self._float_tables[dtype] = self.g_table.to(dtype).contiguous()
        return table

    def continuation_index(self, context_hash: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """(B, V) column of the g table for each row's context hash and continuation: (h_b + v) mod S."""
        size = self.g_table.shape[1]
        return ((context_hash % size)[:, None] + torch.arange(vocab_size, device=context_hash.device)) % size

    def context_g_values(self, context_hash: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """(B, V, depth) g-values of every continuation: what ``sample_g_values(_compute_keys(context, all
        continuations)[0])`` gives for contexts with these hashes."""
        return self.g_table[:, self.continuation_index(context_hash, vocab_size)].permute(1, 2, 0)

    def tilt(self, scores: torch.Tensor, context_hash: torch.Tensor) -> torch.Tensor:
        """transformers' ``update_scores`` on the g-values of ``context_hash``, bit for bit: the same float
        operations in the same order, layer by layer, on a contiguous (B, V) slice per layer."""
        batch, vocab = scores.shape
        probs = torch.softmax(scores, dim=1)
        index = self.continuation_index(context_hash, vocab).reshape(-1)
        g = torch.empty(batch * vocab, dtype=probs.dtype, device=probs.device)
        buf = torch.empty_like(probs)
        for layer in self._table(probs.dtype):
            torch.index_select(layer, 0, index, out=g)
            g_layer = g.view(batch, vocab)
            torch.mul(g_layer, probs, out=buf)  # g * probs, exact (g is 0 or 1)
            mass = buf.sum(dim=1, keepdim=True)
            torch.add(g_layer, 1, out=buf).sub_(mass)  # (1 + g) - mass
            probs.mul_(buf)
        log_probs = torch.log(probs)
        return torch.where(torch.isfinite(log_probs), log_probs, torch.finfo(log_probs.dtype).min)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        # transformers' __call__ (5.25) with steps 2-4 (_compute_keys, sample_g_values, update_scores) as one tilt.
        self._check_input_ids_shape(input_ids)
        batch_size, _ = scores.shape
        if self.debug_mode:
            scores = torch.ones_like(scores)
        if self.state is None:
            self._init_state(batch_size)
        else:
            self.state.context = torch.concat((self.state.context, input_ids[:, -1:]), dim=1)[:, 1:]
        self.state.num_calls += 1
        if self.skip_first_ngram_calls and self.state.num_calls < self.ngram_len:
            return scores

        context_hash = self.accumulate_hash(torch.ones(batch_size, device=self.device, dtype=torch.long), self.state.context)
        updated_scores = self.tilt(scores, context_hash)

        context_hash = context_hash[:, None]
        is_repeated_context = (self.state.context_history == context_hash).any(dim=1, keepdim=True)
        self.state.context_history = torch.concat((context_hash, self.state.context_history), dim=1)[:, :-1]
        return torch.where(is_repeated_context, input=scores, other=updated_scores)


class FastSynthIDTextWatermarkingConfig(SynthIDTextWatermarkingConfig):
    """``SynthIDTextWatermarkingConfig`` whose processor is :class:`FastSynthIDTextWatermarkLogitsProcessor`
    (transformers' own for a table size that is not a power of two). Pass it as ``watermarking_config=``:
    ``generate`` then places the processor exactly where it places transformers' one."""

    def construct_processor(self, vocab_size: int, device) -> SynthIDTextWatermarkLogitsProcessor:
        if self.sampling_table_size & (self.sampling_table_size - 1):
            return super().construct_processor(vocab_size, device)
        return FastSynthIDTextWatermarkLogitsProcessor(
            ngram_len=self.ngram_len,
            keys=self.keys,
            sampling_table_size=self.sampling_table_size,
            sampling_table_seed=self.sampling_table_seed,
            context_history_size=self.context_history_size,
            device=device,
            skip_first_ngram_calls=self.skip_first_ngram_calls,
            debug_mode=self.debug_mode,
        )
