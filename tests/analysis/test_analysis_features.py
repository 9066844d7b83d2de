"""Feature statistics, sparsity report, max-activating examples and token text against dense computations."""
from collections import Counter

import pytest
import torch

from analysis_helpers import VOCAB, make_tokenizer
from saefast.analysis.database import ActivationDatabase
from saefast.analysis.features import (LOG10_DENSITY_OF_DEAD, feature_stats, max_activating_examples,
                                       sparsity_report, token_strings, top_tokens)

N_WINDOWS, SEQ, D_SAE = 9, 8, 23


def _random_db(seed: int = 0):
    """A database over N_WINDOWS windows of SEQ tokens; position 0 of each window (BOS) is not stored.
    Returns (db, dense [n_tokens, d_sae], windows [N_WINDOWS, SEQ])."""
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(3, len(VOCAB), (N_WINDOWS, SEQ), generator=g)
    windows[:, 0] = 1
    n_tokens = N_WINDOWS * (SEQ - 1)
    dense = torch.rand(n_tokens, D_SAE, generator=g) * (torch.rand(n_tokens, D_SAE, generator=g) < 0.25)
    dense[:, 3] = 0                      # a dead feature
    dense[:, 7] = 0.5 + dense[:, 7]      # a dense feature (fires everywhere)
    dense[[4, 9, 30, 31], 11] = 0.75     # ties inside one feature
    dense[:, 11] *= (dense[:, 11] == 0.75)
    t, f = torch.nonzero(dense, as_tuple=True)
    wid = torch.arange(n_tokens) // (SEQ - 1)
    pos = torch.arange(n_tokens) % (SEQ - 1) + 1
    db = ActivationDatabase(dense[t, f], f, t, n_tokens, D_SAE, token_ids=windows[wid, pos], window_ids=wid,
                            positions=pos, context_window_ids=torch.arange(N_WINDOWS), context_tokens=windows)
    return db, dense, windows


def test_feature_stats_and_sparsity_report_match_dense():
    db, dense, _ = _random_db()
    stats = feature_stats(db)
    fires = dense > 0
    counts = fires.sum(0)
    assert torch.equal(stats.counts, counts)
    torch.testing.assert_close(stats.density, counts.double() / dense.shape[0])
    mean = torch.where(counts > 0, dense.double().sum(0) / counts.clamp_min(1), torch.zeros(D_SAE, dtype=torch.float64))
    torch.testing.assert_close(stats.mean_activation, mean)
    torch.testing.assert_close(stats.max_activation, dense.max(0).values)
    assert stats.log10_density[3] == LOG10_DENSITY_OF_DEAD
    torch.testing.assert_close(stats.log10_density[7], torch.tensor(0.0, dtype=torch.float64))

    report = sparsity_report(db, dense_threshold=0.3, rare_threshold=0.02)
    l0 = fires.sum(1).double()
    assert report["n_tokens"] == dense.shape[0] and report["nnz"] == int(fires.sum())
    assert report["l0_mean"] == pytest.approx(float(l0.mean()))
    assert report["l0_std"] == pytest.approx(float(l0.std(unbiased=False)))
    assert report["l0_median"] == float(l0.median()) and report["l0_max"] == int(l0.max())
    assert report["l1_mean"] == pytest.approx(float(dense.double().sum(1).mean()))
    assert report["inactive_features"] == torch.nonzero(counts == 0).flatten().tolist()
    assert 3 in report["inactive_features"]
    assert report["inactive_fraction"] == pytest.approx(report["n_inactive"] / D_SAE)
    assert "n_dead" not in report  # dead is the SAE's training counter: no SAE given, no dead count
    density = counts.double() / dense.shape[0]
    assert report["dense_features"] == torch.nonzero(density > 0.3).flatten().tolist()
    assert report["n_rare"] == int(((counts > 0) & (density < 0.02)).sum())
    live = torch.log10(density[counts > 0])
    assert report["log10_density_quantiles"]["p50"] == pytest.approx(float(torch.quantile(live, 0.5)))


def test_feature_and_token_queries_match_dense_argsort():
    db, dense, _ = _random_db(1)
    for f in range(D_SAE):
        col = dense[:, f]
        order = torch.argsort(-col, stable=True)          # descending, ties by lower token index
        order = order[col[order] > 0]
        tokens, values = db.feature_activations(f)
        assert tokens.tolist() == order.tolist(), f
        torch.testing.assert_close(values, col[order])
        top_tokens_, top_values = db.feature_activations(f, top_k=3)
        assert top_tokens_.tolist() == order[:3].tolist()
    assert db.feature_activations(11)[0].tolist() == [4, 9, 30, 31]
    for t in (0, 17, dense.shape[0] - 1):
        row = dense[t]
        order = torch.argsort(-row, stable=True)
        order = order[row[order] > 0]
        feats, values = db.token_activations(t)
        assert feats.tolist() == order.tolist()
        torch.testing.assert_close(values, row[order])
    query = torch.tensor([5, -1, 0, 40, 62])
    expected = torch.cat([dense[[5], 7], torch.zeros(1), dense[[0, 40, 62], 7]])
    torch.testing.assert_close(db.values_at(7, query), expected)


def test_max_activating_examples_with_contexts_and_text():
    db, dense, windows = _random_db(2)
    tok = make_tokenizer()
    f = 5
    before, after = 3, 2
    examples = max_activating_examples(db, f, n=4, before=before, after=after, tokenizer=tok)
    order = torch.argsort(-dense[:, f], stable=True)[:4]
    assert [e.token_index for e in examples] == order.tolist()
    for ex, t in zip(examples, order.tolist()):
        w, p = t // (SEQ - 1), t % (SEQ - 1) + 1
        lo, hi = max(0, p - before), min(SEQ, p + after + 1)
        assert ex.activation == pytest.approx(float(dense[t, f]))
        assert (ex.window_id, ex.position, ex.token_id) == (w, p, int(windows[w, p]))
        assert ex.context_ids == windows[w, lo:hi].tolist() and ex.center == p - lo
        # the feature's activation on every context token; position 0 (BOS) is not stored -> 0
        want = [float(dense[w * (SEQ - 1) + q - 1, f]) if q > 0 else 0.0 for q in range(lo, hi)]
        assert ex.context_acts == pytest.approx(want)
        assert "".join(ex.context_text) == tok.decode(windows[w, lo:hi].tolist())
    assert max_activating_examples(db, 3, n=5) == []      # dead feature

    ids = windows[0, 1:6].tolist()
    assert top_tokens(db, 7, n=3) == sorted(Counter(db.token_ids.tolist()).items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    assert "".join(token_strings(tok, ids)) == tok.decode(ids)
    assert token_strings(None, [4, -1]) == ["<4>", ""]
    assert token_strings(tok, [4, -1, 5]) == [tok.decode([4]), "", tok.decode([5])]
    with pytest.raises(ValueError, match="n=-1 must be a non-negative integer"):
        max_activating_examples(db, 0, n=-1)
    with pytest.raises(ValueError, match=r"dense_threshold=0 must be in \(0, 1\]"):
        sparsity_report(db, dense_threshold=0)
