"""Measures taken at every checkpoint, with the same functions used on pretrained models.

**Regression** (fixed evaluation set: ``n_per_concept`` sequences per basis, optionally null):

- ``loss``: MSE over all ``K`` predictions, per concept (``concept=all``: over the bases);
  ``loss_rel``: that MSE divided by the mean ``y^2`` of the same sequences (1 = no better than predicting 0,
  whatever the sampled weights' norms); ``loss_last``: at the last example only; ``loss_at_k``: at each
  example, ``shots`` = the number of examples before it (the in-context learning curve).
- ``cd_knn`` / ``probe_accuracy`` per layer (0 = embeddings, ``l`` = output of block ``l``), overall
  (``all``) and per concept: :func:`~conceptprobe.measures.decodability.knn_decodability` (k-NN,
  leave-one-out, z-scored) and :func:`~conceptprobe.measures.decodability.probe_accuracy` (5-fold logistic
  probe) on the residual stream at the last ``x`` token (``position`` 0, sequence index ``2K - 2``: right
  before the model predicts the last ``y``; the run pipeline's convention) and at the ``y`` token before it
  (``position`` -1: the context alone, without the query input). Chance is 1 / number of concepts.
- saved tensors: ``reps`` and ``reps_context`` ``[n_layers + 1, n, d]`` (float16, positions 0 and -1) and
  ``concept [n]``, for the UMAP snapshots.

**Induction** (fixed evaluation set of ``n_contexts`` sequences; ``T`` tokens after BOS):

- ``loss`` over all tokens; ``loss_copy`` over tokens predictable by induction (continuations of a
  repeat); ``loss_fresh`` over the others.
- ``icl_score``: Olsson et al.'s ICL score adapted to the length, loss of token ``round(T * 500/512)``
  minus token ``round(T * 50/512)`` (1-based, after BOS), via :func:`~conceptprobe.measures.icl_score.icl_score`
  (``icl_score_ci_low`` / ``_high``: 95% bootstrap interval over contexts).
- ``prefix_matching`` (and ``copying`` where the architecture allows) per layer and head
  (``head`` column), from :func:`~conceptprobe.measures.induction.induction_head_scores` on
  ``head_seqs`` sequences of ``min(25, T // 4)`` distinct random tokens repeated 4 times after BOS.
- saved tensors: ``token_losses [n_token_loss_contexts, T]`` and their ``input_ids``, for the PCA of
  per-token loss vectors across checkpoints (:func:`~conceptprobe.measures.token_loss.token_loss_pca`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from conceptprobe.measures.decodability import knn_decodability, probe_accuracy, stratified_fold_ids
from conceptprobe.tasks.synthetic_data import (
    BOS,
    NULL,
    RegressionSpec,
    SegmentSpec,
    regression_eval_set,
    segments_eval_set,
)
from conceptprobe.training.model import ModelSpec, residual_stream

if TYPE_CHECKING:
    from conceptprobe.training.trainer import TrainConfig

Rows = list[dict[str, Any]]


def icl_positions(n_tokens: int) -> tuple[int, int]:
    """``(early, late)`` 1-based token indices: Olsson's 50 and 500 of 512, scaled to ``n_tokens``."""
    early = max(1, round(n_tokens * 50 / 512))
    late = max(early + 1, min(n_tokens, round(n_tokens * 500 / 512)))
    return early, late


class RegressionTracker:
    """Per-concept losses, decodability per layer and the representations, on a fixed evaluation set."""

    OFFSETS = (0, -1)  # the last x token, and the y token before it (the context without the query)

    def __init__(self, cfg: TrainConfig, spec: RegressionSpec, device: torch.device) -> None:
        t = cfg.tracking
        self.spec, self.t, self.seed = spec, t, cfg.seed
        self.batch = regression_eval_set(spec, t.n_per_concept, cfg.seed, include_null=t.include_null)
        self.tokens = torch.from_numpy(self.batch.tokens(spec.y_tokens)).to(device)
        self.y = torch.from_numpy(self.batch.y).float()
        self.labels = self.batch.labels(spec)
        self.concepts = list(spec.concepts) + ([NULL] if t.include_null else [])
        self.positions = [spec.seq_len - 2 + o for o in self.OFFSETS]
        self.fold_ids = stratified_fold_ids(self.labels, t.probe_folds, cfg.seed) if t.probe else None

    def representations(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions ``[n, K]`` and the residual stream ``[n_layers + 1, n, len(OFFSETS), d]``."""
        out: list[torch.Tensor] = []
        reps = residual_stream(model.blocks, lambda: out.append(model(self.tokens)), self.positions)
        return out[0][:, 0::2].float().cpu(), reps

    def measure(self, model: torch.nn.Module, step: int) -> tuple[Rows, dict[str, torch.Tensor], str]:
        with torch.no_grad():
            pred, reps = self.representations(model)
        err = (pred - self.y) ** 2  # [n, K]
        y2 = self.y**2
        rows: Rows = []
        concept_idx = self.batch.concept
        groups = [("all", concept_idx >= 0)] + [
            (name, concept_idx == (c if name != NULL else -1)) for c, name in enumerate(self.concepts)
        ]
        losses = {}
        for name, sel in groups:
            mask = torch.from_numpy(sel)
            e = err[mask]
            losses[name] = float(e.mean())
            rows.append(dict(concept=name, metric="loss", value=losses[name]))
            rows.append(dict(concept=name, metric="loss_rel", value=float(e.mean() / y2[mask].mean())))
            rows.append(dict(concept=name, metric="loss_last", value=float(e[:, -1].mean())))
            if name != "all":
                for k, v in enumerate(e.mean(0).tolist()):
                    rows.append(dict(concept=name, shots=k, metric="loss_at_k", value=v))
        peak = (0.0, 0)
        for p, offset in enumerate(self.OFFSETS):
            x = reps[:, :, p]
            results = [("cd_knn", knn_decodability(x, self.labels, k=self.t.knn_k))]
            if self.t.probe:
                results.append(("probe_accuracy", probe_accuracy(x, self.labels, fold_ids=self.fold_ids)))
            for metric, res in results:
                for layer in range(x.shape[0]):
                    rows.append(
                        dict(
                            concept="all",
                            layer=layer,
                            position=offset,
                            metric=metric,
                            value=float(res.overall[layer]),
                        )
                    )
                    for name in res.classes:
                        rows.append(
                            dict(
                                concept=name,
                                layer=layer,
                                position=offset,
                                metric=metric,
                                value=float(res.per_concept[name][layer]),
                            )
                        )
            if offset == 0:
                knn = results[0][1].overall
                peak = (float(knn.max()), int(np.argmax(knn)))
        summary = (
            f"loss {losses['all']:.3f} ("
            + " ".join(f"{k} {v:.2f}" for k, v in losses.items() if k != "all")
            + f"); k-NN CD peak {peak[0]:.2f} at layer {peak[1]}"
        )
        tensors = {"reps": reps[:, :, 0].half(), "reps_context": reps[:, :, 1].half()}
        tensors["concept"] = torch.from_numpy(concept_idx)
        return rows, tensors, summary


class InductionTracker:
    """Losses, the ICL score, head scores and per-token loss vectors on a fixed evaluation set."""

    def __init__(self, cfg: TrainConfig, spec: SegmentSpec, device: torch.device) -> None:
        t = cfg.tracking
        self.spec, self.t, self.seed, self.device = spec, t, cfg.seed, device
        batch = segments_eval_set(spec, t.n_contexts, cfg.seed)
        self.ids = torch.from_numpy(batch.ids)
        self.copy = torch.from_numpy(batch.predictable[:, 1:])
        self.early, self.late = icl_positions(spec.seq_len)
        if self.late + t.icl_window > spec.seq_len or self.early - t.icl_window < 1:
            raise ValueError(f"icl_window {t.icl_window} is too wide for sequences of {spec.seq_len} tokens")
        self.head_len = min(25, spec.seq_len // 4)

    def token_losses(self, model: torch.nn.Module, batch_size: int = 64) -> torch.Tensor:
        """``[n, T]`` nats; column ``t - 1`` is the loss of token ``t`` after BOS."""
        out = []
        with torch.no_grad():
            for b in range(0, len(self.ids), batch_size):
                ids = self.ids[b : b + batch_size].to(self.device)
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                loss = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
                )
                out.append(loss.view(ids.shape[0], -1).cpu())
        return torch.cat(out)

    def measure(self, model: torch.nn.Module, step: int) -> tuple[Rows, dict[str, torch.Tensor], str]:
        from conceptprobe.measures.icl_score import icl_score
        from conceptprobe.measures.induction import induction_head_scores

        losses = self.token_losses(model)
        rows: Rows = [
            dict(concept="all", layer=None, metric="loss", value=float(losses.mean())),
            dict(concept="copy", layer=None, metric="loss_copy", value=float(losses[self.copy].mean())),
            dict(concept="fresh", layer=None, metric="loss_fresh", value=float(losses[~self.copy].mean())),
        ]
        score = icl_score(
            losses, late=self.late, early=self.early, n_boot=500, seed=self.seed, window=self.t.icl_window
        )
        for metric, value in (
            ("icl_score", score.score),
            ("icl_score_ci_low", score.ci_low),
            ("icl_score_ci_high", score.ci_high),
        ):
            rows.append(dict(concept="all", layer=None, position=None, metric=metric, value=float(value)))
        heads = induction_head_scores(
            model,
            np.arange(1, self.spec.vocab_size),
            prefix=[BOS],
            n_seqs=self.t.head_seqs,
            seq_len=self.head_len,
            n_repeats=4,
            seed=self.seed,
        )
        n_layers, n_heads = heads.prefix_matching.shape
        for layer in range(n_layers):
            for head in range(n_heads):
                rows.append(
                    dict(
                        concept="all",
                        layer=layer,
                        head=head,
                        metric="prefix_matching",
                        value=float(heads.prefix_matching[layer, head]),
                    )
                )
                if heads.copying is not None:
                    rows.append(
                        dict(
                            concept="all",
                            layer=layer,
                            head=head,
                            metric="copying",
                            value=float(heads.copying[layer, head]),
                        )
                    )
        best = heads.prefix_matching.max(dim=1).values
        n_tl = min(self.t.n_token_loss_contexts, len(self.ids))
        tensors = {"token_losses": losses[:n_tl].contiguous(), "input_ids": self.ids[:n_tl].contiguous()}
        summary = (
            f"loss {float(losses.mean()):.3f} (copies {float(losses[self.copy].mean()):.3f}); "
            f"ICL score {score.score:+.3f}; max prefix matching per layer "
            + " ".join(f"{v:.2f}" for v in best.tolist())
        )
        return rows, tensors, summary


def make_tracker(
    cfg: TrainConfig, spec: RegressionSpec | SegmentSpec, model_spec: ModelSpec, device: torch.device
) -> RegressionTracker | InductionTracker:
    """The tracker of the run's task."""
    if isinstance(spec, RegressionSpec):
        return RegressionTracker(cfg, spec, device)
    return InductionTracker(cfg, spec, device)
