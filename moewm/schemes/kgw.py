"""KGW (Kirchenbauer et al., 2023) through transformers' ``WatermarkingConfig`` (generation) and the green
lists of its ``WatermarkDetector`` (detection).

KGW detection scores only the continuation: the detector gets the last ``context_width`` prompt tokens as
context (lefthash) in front of the text, plus one sentinel token that it strips as "bos". Its z uses the
nominal ``greenlist_ratio``; we use the exact green-list fraction ``int(V * ratio) / V`` that its processor
uses (``gamma_mean``) and the exact binomial tail of the count of distinct n-grams.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import numpy as np
import torch
from transformers import WatermarkDetector, WatermarkingConfig
from transformers.generation.logits_process import WatermarkLogitsProcessor

from moewm.config import ConfigError, WatermarkConfig
from moewm.engine.keys import WatermarkKey
from moewm.engine.positions import PositionContexts, PositionScores
from moewm.engine.scoring import first_occurrences
from moewm.engine.generation import check_text_ids
from moewm.schemes.ngram_base import IdsCapture, TransformersWatermark, key_int


class KGWProcessor(WatermarkLogitsProcessor):
    """transformers' KGW processor with two repairs, identical to it everywhere else (lefthash over one token, and
    every selfhash step that has a green candidate):

    * **lefthash over h > 1 tokens.** transformers seeds lefthash by ``hashing_key x`` the last token whatever its
      ``context_width``, while its detector deduplicates (h + 1)-grams: a wider context then changed nothing but the
      repeat rule, so repeated bigrams inside distinct (h + 1)-grams counted as independent draws and a repetitive
      text (greedy output) was flagged under every key (measured: one greedy text at p <= 1e-3 under 3 of 3 keys).
      Here the seed hashes all h tokens before, the Additive-LeftHash of Kirchenbauer et al. (2024, "On the
      reliability of watermarks"): ``hashing_key x sum_i (T[t_i] + 1)`` with transformers' own fixed table T.
    * **selfhash with no green candidate.** When the 40 best candidates of a step are all red, transformers builds the
      empty green list as a float tensor, which cannot index the scores (an IndexError at about one step in 10^5
      with gamma 0.25); here that step boosts nothing.
    """

    def set_seed(self, input_seq: torch.LongTensor) -> None:
        if self.seeding_scheme != "lefthash" or self.context_width == 1:
            return super().set_seed(input_seq)
        context = input_seq[-self.context_width :]
        seed = self.hash_key * int((self.fixed_table[context % self.table_size] + 1).sum().item())
        self.rng.manual_seed(seed % (2**64 - 1))

    def _score_rejection_sampling(self, input_seq: torch.LongTensor, scores: torch.Tensor) -> torch.LongTensor:
        return super()._score_rejection_sampling(input_seq, scores).long()


class KGWWatermarkingConfig(WatermarkingConfig):
    """``WatermarkingConfig`` whose processor is :class:`KGWProcessor`; ``generate`` places it where it places
    transformers' own."""

    def construct_processor(self, vocab_size: int, device: Any) -> WatermarkLogitsProcessor:
        return KGWProcessor(vocab_size=vocab_size, device=device, greenlist_ratio=self.greenlist_ratio, bias=self.bias,
                            hashing_key=self.hashing_key, seeding_scheme=self.seeding_scheme, context_width=self.context_width)


class KGWWatermark(TransformersWatermark):
    """Kirchenbauer et al. (2023) through ``transformers.WatermarkingConfig`` / ``WatermarkDetector``."""

    name = "kgw"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, watermark_cfg: WatermarkConfig, key: WatermarkKey) -> None:
        super().__init__(model, tokenizer, watermark_cfg, key)
        self._config = KGWWatermarkingConfig(
            greenlist_ratio=watermark_cfg.kgw.gamma,
            bias=watermark_cfg.delta,
            hashing_key=key_int(key, "kgw"),
            seeding_scheme=watermark_cfg.kgw.seeding_scheme,
            context_width=watermark_cfg.kgw.context_width,
        )
        self._config.validate()
        # The detector strips a leading "bos" (model_config.bos_token_id) and fails when that id is None;
        # we give it a config copy whose bos is a sentinel that we always prepend, so it strips exactly that.
        model_config = copy.copy(model.config.get_text_config())
        self._sentinel = tokenizer.bos_token_id if getattr(tokenizer, "bos_token_id", None) is not None else 0
        model_config.bos_token_id = self._sentinel
        self.detector = WatermarkDetector(
            model_config=model_config,
            device=str(self.device),
            watermarking_config=self._config,
            ignore_repeated_ngrams=watermark_cfg.ignore_repeated,
        )
        # The detector scores with the processor that generated (KGWProcessor: lefthash over every context token).
        self.detector.processor = self._config.construct_processor(model_config.vocab_size, str(self.device))
        proc = self.detector.processor
        if proc.vocab_size != self.vocab_size:
            raise ConfigError(
                f"KGW: model.config.vocab_size={proc.vocab_size} differs from the output head's {self.vocab_size}; "
                "the transformers KGW processor would key a different vocabulary"
            )
        self.selfhash = int(proc.seeding_scheme == "selfhash")
        self.ngram = proc.context_width + 1 - self.selfhash  # tokens per scored n-gram (the detector's n)
        self.gamma = proc.greenlist_size / proc.vocab_size  # exact green fraction

    def settings_metrics(self) -> dict[str, Any]:
        c = self.watermark_cfg.kgw
        return {"kgw_gamma": float(c.gamma), "kgw_seeding_scheme": c.seeding_scheme, "kgw_context_width": int(c.context_width)}

    @property
    def watermarking_config(self) -> WatermarkingConfig:
        return self._config

    def _rows(self, text_ids: Sequence[Sequence[int]], prompt_ids: list[list[int]]) -> list[tuple[list[int], int]]:
        """Context tail + text per row, and how many context tokens lead it."""
        need = self.ngram - 1
        out = []
        for p, t in zip(prompt_ids, text_ids):
            tail = p[-need:] if need > 0 else []
            out.append((tail + list(t), len(tail)))
        return out

    def draws(self, text_ids: Sequence[Sequence[int]], prompt_ids: list[list[int]]) -> PositionScores:
        """Green flags of the continuation's distinct n-grams. Repeated n-grams are always scored once here: a
        repeat is the same draw again, and counting it twice is what breaks KGW's p-value on greedy loops."""
        return self.position_scores(text_ids, prompt_ids, distinct=True)

    @torch.no_grad()
    def position_scores(
        self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None, distinct: Optional[bool] = None
    ) -> PositionScores:
        """Green flag of every scored continuation token, from the detector's own processor
        (``distinct``: score each n-gram once; default ``watermark.ignore_repeated``)."""
        green, scored, first, _ = self._positions(text_ids, prompt_ids)
        if self.watermark_cfg.ignore_repeated if distinct is None else distinct:  # each distinct n-gram once per text
            scored = first
        gamma = torch.full(green.shape, self.gamma, dtype=torch.float64)
        return PositionScores.from_positions(green & scored, gamma, scored)

    def position_contexts(self, captures: Sequence[IdsCapture]) -> list[PositionContexts]:
        """Per text: each scored token's context (the ids that seed its green list: the previous ``context_width``
        tokens, the prompt's last ones at the start; with selfhash the token too), its green flag, whether
        detection counts it (distinct n-grams) and its standardised green excess."""
        if not captures:
            return []
        green, has, first, context = self._positions([list(c.text_ids) for c in captures], [list(c.prompt_ids) for c in captures])
        gamma = torch.full(green.shape, self.gamma, dtype=torch.float64)
        evidence = PositionContexts.standardised(green.unsqueeze(-1), gamma.unsqueeze(-1), first)
        out = []
        for i, c in enumerate(captures):
            at = torch.nonzero(has[i], as_tuple=True)[0]
            ctx = context[i, at].numpy()
            out.append(PositionContexts(positions=at.numpy().astype(np.int64), tokens=np.asarray(c.text_ids, dtype=np.int64)[at.numpy()],
                                        context=ctx, green_list=ctx, green=green[i, at, None].numpy(), scored=first[i, at].numpy(),
                                        evidence=evidence[i, at].numpy()))
        return out

    def _positions(self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L) green flag, has-an-n-gram and first-occurrence-of-its-n-gram masks of every continuation token,
        and (B, L, c) the ids that seed each one's green list.

        The green list is a seeded ``randperm`` of the vocabulary per context (not vectorisable), so it is
        drawn once per distinct context of the batch and membership is then looked up in bulk.
        """
        check_text_ids(text_ids, self.vocab_size)
        prompts = self._prompts(text_ids, prompt_ids)
        proc = self.detector.processor
        n = self.ngram
        rows = self._rows(text_ids, prompts)
        length = max(len(t) for t in text_ids)
        width = n if self.selfhash else n - 1
        green = torch.zeros(len(rows), length, dtype=torch.bool)
        scored = torch.zeros(len(rows), length, dtype=torch.bool)
        first = torch.zeros(len(rows), length, dtype=torch.bool)
        context = torch.full((len(rows), length, width), -1, dtype=torch.long)
        windows, where = [], []
        for i, (row, lead) in enumerate(rows):
            r = torch.tensor(row, dtype=torch.long)
            if r.numel() < n:
                continue
            w = r.unfold(0, n, 1)  # (num, n): n-grams ending at positions n-1 .. len-1 of the row
            ends = torch.arange(n - 1, r.numel()) - lead  # their target's index in the text
            keep = ends >= 0
            windows.append(w[keep])
            where.append(torch.stack([torch.full_like(ends[keep], i), ends[keep]], 1))
        if windows:
            grams = torch.cat(windows)
            at = torch.cat(where)
            seeds = grams if self.selfhash else grams[:, :-1]
            uniq, inverse = torch.unique(seeds, dim=0, return_inverse=True)
            hit = torch.zeros(grams.shape[0], dtype=torch.bool)
            order = torch.argsort(inverse, stable=True)
            bounds = torch.searchsorted(inverse[order], torch.arange(uniq.shape[0] + 1))
            targets = grams[:, -1]
            for u in range(uniq.shape[0]):  # one seeded randperm per distinct context (what the detector does)
                members = order[bounds[u] : bounds[u + 1]]
                greenlist = proc._get_greenlist_ids(uniq[u].to(self.device)).cpu()
                hit[members] = torch.isin(targets[members], greenlist)
            green[at[:, 0], at[:, 1]] = hit
            scored[at[:, 0], at[:, 1]] = True
            context[at[:, 0], at[:, 1]] = seeds
            _, gram_id = torch.unique(grams, dim=0, return_inverse=True)
            keys = torch.full((len(rows), length), -1, dtype=torch.long)
            keys[at[:, 0], at[:, 1]] = gram_id
            first = first_occurrences(keys, scored)
        return green, scored, first, context
