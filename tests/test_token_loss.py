"""Per-token loss files, alignment across folders, PCA and the token-loss-pca command."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conceptprobe.measures.token_loss import (
    align,
    read_token_losses,
    token_loss_pca,
    write_token_losses,
)

N_CTX, N_TOK = 6, 20


def _base(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    losses = rng.gamma(2.0, 1.0, size=(N_CTX, N_TOK))
    direction = rng.normal(size=(N_CTX, N_TOK))
    return losses, direction


def _write(folder, losses, doc_ids, label, input_ids=None, n_prefix=1):
    ids = input_ids if input_ids is not None else torch.arange(N_TOK + n_prefix).repeat(len(losses), 1)
    write_token_losses(folder, torch.tensor(losses), ids, n_prefix, doc_ids)
    (folder / "icl.json").write_text(json.dumps({"model": {"alias": label, "ref": label}}))


def test_roundtrip_and_alignment_by_document(tmp_path):
    losses, _ = _base()
    docs = [f"d{i}#0" for i in range(N_CTX)]
    a = losses.copy()
    a[:, 0] = np.nan  # a model without BOS has no loss for token 1
    b = losses[::-1] + 1.0  # contexts stored in reverse order ...
    b = np.vstack([b, np.full((1, N_TOK), 9.0)])  # ... plus one context the other folder lacks
    _write(tmp_path / "a", a, docs, "A")
    _write(tmp_path / "b", b, docs[::-1] + ["extra#0"], "B")
    ra, rb = read_token_losses(tmp_path / "a"), read_token_losses(tmp_path / "b")
    assert ra.label == "A" and ra.n_prefix == 1 and ra.doc_ids == docs
    np.testing.assert_allclose(ra.losses[:, 1:], losses[:, 1:], rtol=1e-6)
    matrix, meta = align([ra, rb])
    assert meta["n_contexts"] == N_CTX and meta["token_columns"] == [2, N_TOK]
    assert matrix.shape == (2, N_CTX * (N_TOK - 1))
    np.testing.assert_allclose(matrix[1] - matrix[0], 1.0, rtol=1e-5)  # same positions, matched by doc id
    np.testing.assert_allclose(matrix[0], losses[:, 1:].ravel(), rtol=1e-6)
    assert meta["same_tokens"] is True
    sub, sub_meta = align([ra, rb], positions=10, seed=3)
    assert sub.shape == (2, 10) and sub_meta["positions_subset"] and set(sub[0]).issubset(set(matrix[0]))
    with pytest.raises(ValueError, match="at least two"):
        align([ra])
    with pytest.raises(FileNotFoundError, match="icl-score"):
        read_token_losses(tmp_path / "missing")


def test_pca_recovers_a_one_dimensional_trajectory(tmp_path):
    losses, direction = _base(1)
    docs = [f"d{i}#0" for i in range(N_CTX)]
    steps = [0.0, 1.0, 2.0, 4.0]
    runs = []
    for k, s in enumerate(steps):
        _write(tmp_path / f"ckpt{k}", losses + s * direction, docs, f"step{k}")
        runs.append(read_token_losses(tmp_path / f"ckpt{k}"))
    res = token_loss_pca(runs)
    assert res["explained_variance_ratio"][0] > 0.999
    pc1 = np.array(res["coords"])[:, 0] * np.sign(res["coords"][-1][0] - res["coords"][0][0])
    gaps = np.diff(pc1) / np.diff(steps)  # positions along PC1 proportional to the step sizes
    np.testing.assert_allclose(gaps, gaps[0], rtol=1e-4)
    np.testing.assert_allclose(abs(gaps[0]), np.linalg.norm(direction), rtol=1e-4)
    other_ids = torch.arange(N_TOK + 1).repeat(N_CTX, 1).flip(1)
    _write(tmp_path / "other", losses + direction, docs, "other", input_ids=other_ids)
    with pytest.raises(ValueError, match="step0 and other scored different tokens"):
        token_loss_pca([runs[0], read_token_losses(tmp_path / "other")])


def test_token_loss_pca_cli(tmp_path):
    import typer
    from typer.testing import CliRunner

    from conceptprobe.commands.induction_cmds import register

    losses, direction = _base(2)
    docs = [f"d{i}#0" for i in range(N_CTX)]
    folders = []
    for k in range(3):
        _write(tmp_path / f"r{k}", losses + k * direction, docs, "same-label")
        folders.append(str(tmp_path / f"r{k}"))
    app = typer.Typer()
    register(app)
    out = tmp_path / "pca"
    result = CliRunner().invoke(app, ["token-loss-pca", *folders, "--trajectory", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads((out / "token_loss_pca.json").read_text())
    assert data["labels"] == ["same-label (r0)", "same-label (r1)", "same-label (r2)"]
    assert data["trajectory"] is True and data["n_positions"] == N_CTX * N_TOK
    assert (out / "token_loss_pca.png").stat().st_size > 1000
    metrics = pd.read_parquet(out / "metrics.parquet")
    pc1 = metrics[metrics.metric == "pc1"].set_index("model").value
    assert [pc1[label] for label in data["labels"]] == pytest.approx([xy[0] for xy in data["coords"]])
    single = CliRunner().invoke(app, ["token-loss-pca", folders[0], "--out", str(out)])
    assert single.exit_code != 0 and "at least two" in str(single.exception)
