"""Decoder similarity and co-occurrence against dense numpy computations."""
import numpy as np
import pytest
import torch

from saefast.analysis.database import ActivationDatabase
from saefast.analysis.similarity import (COOCCURRENCE_METRICS, cooccurrence_counts, cooccurrence_scores,
                                         cooccurring_features, decoder_neighbours)


@pytest.mark.parametrize("d_sae,d_in,top_n,chunk", [(37, 9, 5, 4), (8, 3, 7, None), (64, 16, 1, 64)])
def test_decoder_neighbours_match_numpy(d_sae, d_in, top_n, chunk):
    g = torch.Generator().manual_seed(d_sae)
    W = torch.randn(d_sae, d_in, generator=g) * torch.rand(d_sae, 1, generator=g)  # rows of any norm
    W[2] = 0.0                                                                      # a zero row
    values, ids = decoder_neighbours(W, top_n, chunk_size=chunk)
    w = W.double().numpy()
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    unit = np.where(norms > 0, w / np.maximum(norms, 1e-300), 0.0)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    for f in range(d_sae):
        # numpy: descending cosine, ties by lower id (zero row: all cosines 0)
        expected = sorted(range(d_sae), key=lambda j: (-cos[f, j], j))[:top_n]
        assert ids[f].tolist() == expected, f
        np.testing.assert_allclose(values[f].numpy(), cos[f, expected], rtol=1e-5, atol=1e-6)
    sub_values, sub_ids = decoder_neighbours(W, top_n, features=[5, 0, 3], chunk_size=2)
    assert torch.equal(sub_ids, ids[[5, 0, 3]])
    torch.testing.assert_close(sub_values, values[[5, 0, 3]])


def _random_db(seed: int, n_tokens: int = 61, d_sae: int = 19):
    g = torch.Generator().manual_seed(seed)
    fires = torch.rand(n_tokens, d_sae, generator=g) < torch.linspace(0.02, 0.6, d_sae)
    fires[:, 4] = False  # a dead feature
    dense = torch.rand(n_tokens, d_sae, generator=g) * fires
    t, f = torch.nonzero(dense, as_tuple=True)
    return ActivationDatabase(dense[t, f], f, t, n_tokens, d_sae), fires.numpy().astype(np.int64)


@pytest.mark.parametrize("max_pairs", [7, 50, 2 ** 20])
def test_cooccurrence_counts_match_dense(max_pairs):
    db, A = _random_db(0)
    counts = cooccurrence_counts(db, max_pairs=max_pairs)
    assert counts.is_sparse and counts.dtype == torch.int64
    np.testing.assert_array_equal(counts.to_dense().numpy(), A.T @ A)
    assert counts._nnz() == int(((A.T @ A) > 0).sum())  # only pairs that co-occur are stored
    subset = [17, 2, 4, 9]
    sub = cooccurrence_counts(db, features=subset, max_pairs=max_pairs)
    np.testing.assert_array_equal(sub.to_dense().numpy(), (A.T @ A)[np.ix_(subset, subset)])


def _dense_scores(C: np.ndarray, n: int, metric: str) -> np.ndarray:
    ci, cj = np.diag(C)[:, None].astype(float), np.diag(C)[None, :].astype(float)
    c = C.astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "count":
            return c
        if metric == "jaccard":
            return c / (ci + cj - c)
        if metric == "conditional":
            return c / ci
        if metric == "pmi":
            return np.log(c * n / (ci * cj))
        return (n * c - ci * cj) / np.sqrt(ci * (n - ci) * cj * (n - cj))


@pytest.mark.parametrize("metric", COOCCURRENCE_METRICS)
def test_cooccurrence_scores_and_top_features_match_dense(metric):
    db, A = _random_db(1)
    C = A.T @ A
    scores = cooccurrence_scores(cooccurrence_counts(db), db.n_tokens, metric)
    dense = _dense_scores(C, db.n_tokens, metric)
    i, j = scores.coalesce().indices().numpy()
    assert set(zip(i.tolist(), j.tolist())) == set(zip(*np.nonzero(C)))
    np.testing.assert_allclose(scores.coalesce().values().numpy(), dense[i, j], rtol=1e-10)

    for f in (0, 10, 18):
        others = [j for j in range(C.shape[0]) if j != f and C[f, j] > 0]
        expected = sorted(others, key=lambda j: (-dense[f, j], -C[f, j], j))[:5]
        got = cooccurring_features(db, f, top_n=5, metric=metric)
        assert [o for o, _, _ in got] == expected, f
        assert [c for _, c, _ in got] == [int(C[f, j]) for j in expected]
        np.testing.assert_allclose([s for _, _, s in got], dense[f, expected], rtol=1e-10)
    assert cooccurring_features(db, 4, metric=metric) == []  # the dead feature


def test_similarity_bad_input_messages():
    db, _ = _random_db(2)
    with pytest.raises(ValueError, match=r"top_n=40 must be between 1 and d_sae - 1 = 9"):
        decoder_neighbours(torch.randn(10, 3), 40)
    with pytest.raises(ValueError, match=r"W_dec must be a \[d_sae, d_in\] tensor"):
        decoder_neighbours(torch.randn(10), 2)
    with pytest.raises(ValueError, match=r"features must lie in \[0, d_sae=10\)"):
        decoder_neighbours(torch.randn(10, 3), 2, features=[10])
    with pytest.raises(ValueError, match="repeated feature ids"):
        cooccurrence_counts(db, features=[1, 1])
    with pytest.raises(ValueError, match="metric='cosine' must be one of"):
        cooccurring_features(db, 0, metric="cosine")
    with pytest.raises(TypeError, match="counts must be the sparse"):
        cooccurrence_scores(torch.zeros(3, 3), 5)
