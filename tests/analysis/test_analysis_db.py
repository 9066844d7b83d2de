"""Activation database: contents equal a dense computation; metadata, contexts, files, caches, errors."""
import pytest
import torch

from analysis_helpers import (BOS, HOOK, PAD, dense_from_db, dense_topk_codes, make_model, make_sae, make_texts,
                              make_tokenizer, random_windows)
from saefast.analysis.database import (ActivationDatabase, build_database, build_database_from_activations,
                                       build_database_from_cache)
from saefast.data.models import run_to_hook


def _kept_rows(tokens, pad_lengths):
    """(window, position) of every real, non-BOS token, in window order."""
    out = []
    for w in range(tokens.shape[0]):
        n_real = pad_lengths[w] if w < len(pad_lengths) else tokens.shape[1]
        out += [(w, p) for p in range(n_real) if tokens[w, p] != BOS]
    return out


@torch.no_grad()
def test_database_from_model_equals_dense_codes():
    model, sae = make_model(), make_sae()
    pad_lengths = [12, 5, 12, 9, 1]
    tokens = random_windows(7, 12, seed=3, pad_lengths=pad_lengths)
    db = build_database(sae, model, tokens, batch_size=3, exclude_token_ids={BOS}, pad_token_id=PAD, progress=False)

    acts = run_to_hook(model, tokens, HOOK)
    rows = _kept_rows(tokens, pad_lengths)
    x = torch.stack([acts[w, p] for w, p in rows])
    expected = dense_topk_codes(sae, x)
    assert db.n_tokens == len(rows) and db.d_sae == sae.d_sae
    torch.testing.assert_close(dense_from_db(db), expected, rtol=1e-5, atol=1e-6)
    assert db.nnz == int((expected > 0).sum())
    assert db.window_ids.tolist() == [w for w, _ in rows]
    assert db.positions.tolist() == [p for _, p in rows]
    assert db.token_ids.tolist() == [int(tokens[w, p]) for w, p in rows]
    # every window with a stored token is kept whole for contexts (window 4 is only BOS)
    assert db.context_window_ids.tolist() == [0, 1, 2, 3, 5, 6]
    torch.testing.assert_close(db.context_tokens, tokens[[0, 1, 2, 3, 5, 6]])
    assert db.metadata["hook_name"] == HOOK and db.metadata["exclude_token_ids"] == [BOS]

    first = build_database(sae, model, tokens, n_tokens=15, batch_size=2, exclude_token_ids={BOS},
                           pad_token_id=PAD, progress=False)
    assert first.n_tokens == 15
    torch.testing.assert_close(dense_from_db(first), expected[:15], rtol=1e-5, atol=1e-6)
    assert first.window_ids.tolist() == db.window_ids[:15].tolist()


@torch.no_grad()
def test_database_from_token_windows_drops_bos_and_padding():
    from saefast.data.tokens import TokenWindows

    model, sae, tok = make_model(), make_sae(seed=1), make_tokenizer()
    texts = make_texts(6, seed=4)
    db = build_database(sae, model, TokenWindows(texts, tok, 10, prepend_bos=True), batch_size=4, progress=False)
    windows, lengths = [], []
    reader = TokenWindows(texts, tok, 10, prepend_bos=True)
    while True:
        try:
            w, n = reader.next_with_length()
        except StopIteration:
            break
        windows.append(w)
        lengths.append(n)
    tokens = torch.stack(windows)
    rows = _kept_rows(tokens, lengths)
    acts = run_to_hook(model, tokens, HOOK)
    expected = dense_topk_codes(sae, torch.stack([acts[w, p] for w, p in rows]))
    torch.testing.assert_close(dense_from_db(db), expected, rtol=1e-5, atol=1e-6)
    assert BOS not in db.token_ids.tolist() and PAD not in db.token_ids.tolist()
    # the text of each stored token is recoverable from the contexts
    for t in (0, db.n_tokens // 2, db.n_tokens - 1):
        ids, rows_, center = db.context(t, before=3, after=2)
        assert int(ids[center]) == int(db.token_ids[t]) and int(rows_[center]) == t


def test_save_load_roundtrip_and_overwrite(tmp_path):
    g = torch.Generator().manual_seed(0)
    n_tokens, d_sae = 9, 13
    dense = torch.rand(n_tokens, d_sae, generator=g) * (torch.rand(n_tokens, d_sae, generator=g) < 0.3)
    t, f = torch.nonzero(dense, as_tuple=True)
    perm = torch.randperm(t.numel(), generator=g)  # any entry order is accepted and sorted
    db = ActivationDatabase(dense[t, f][perm], f[perm], t[perm], n_tokens, d_sae,
                            token_ids=torch.arange(n_tokens) + 5, window_ids=torch.arange(n_tokens) // 3,
                            positions=torch.arange(n_tokens) % 3, context_window_ids=torch.tensor([2, 0, 1]),
                            context_tokens=torch.arange(9).reshape(3, 3), metadata={"note": "<x>"})
    torch.testing.assert_close(dense_from_db(db), dense)
    keys = db.token_index * d_sae + db.feature_ids.long()
    assert bool((keys[1:] > keys[:-1]).all())
    assert db.context_window_ids.tolist() == [0, 1, 2] and db.context_tokens[0].tolist() == [3, 4, 5]

    path = db.save(tmp_path / "db.safetensors")
    back = ActivationDatabase.load(path)
    for name in ("values", "feature_ids", "token_index", "token_ids", "window_ids", "positions",
                 "context_window_ids", "context_tokens"):
        assert torch.equal(getattr(back, name), getattr(db, name)), name
    assert back.metadata == {"note": "<x>"} and back.n_tokens == n_tokens and back.d_sae == d_sae
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        db.save(path)
    db.save(path, overwrite=True)
    (tmp_path / "other.safetensors").write_bytes(open(path, "rb").read()[:8])
    with pytest.raises(Exception):
        ActivationDatabase.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="no activation database"):
        ActivationDatabase.load(tmp_path / "missing.safetensors")


@torch.no_grad()
def test_database_from_cache_keeps_token_metadata(tmp_path):
    from saefast.data.cache import cache_activations
    from saefast.data.source import ModelActivationSource
    from saefast.data.tokens import TokenWindows

    model, sae, tok = make_model(), make_sae(seed=2), make_tokenizer()
    texts = make_texts(8, seed=5)
    source = ModelActivationSource(model, HOOK, TokenWindows(texts, tok, 12), batch_size=16, model_batch_size=2,
                                   buffer_tokens=48, background=False, with_tokens=True)
    cache = cache_activations(source, tmp_path / "cache", n_tokens=90, shard_tokens=40, progress=False)
    db = build_database_from_cache(sae, cache, batch_size=32, progress=False)

    from safetensors.torch import load_file
    shards = [load_file(str(cache / f"shard_{i:05d}.safetensors")) for i in range(3)]
    cols = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    assert db.n_tokens == 90
    torch.testing.assert_close(dense_from_db(db), dense_topk_codes(sae, cols["activations"]), rtol=1e-5, atol=1e-6)
    for k in ("token_ids", "window_ids", "positions"):
        assert torch.equal(getattr(db, k), cols[k]), k
    # contexts rebuilt from the metadata: every cached token at its place, unknown (-1) elsewhere
    known = torch.full_like(db.context_tokens, -1)
    rows = torch.searchsorted(db.context_window_ids, cols["window_ids"])
    known[rows, cols["positions"]] = cols["token_ids"]
    assert torch.equal(db.context_tokens, known)
    assert db.metadata["source"] == "cache"

    few = build_database_from_cache(sae, cache, n_tokens=50, batch_size=7, progress=False)
    torch.testing.assert_close(dense_from_db(few), dense_from_db(db)[:50])


def test_database_from_activations_without_metadata():
    sae = make_sae(seed=3)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, sae.d_in, generator=g) for n in (5, 11, 3)]
    db = build_database_from_activations(sae, iter(batches), n_tokens=14, progress=False)
    torch.testing.assert_close(dense_from_db(db), dense_topk_codes(sae, torch.cat(batches)[:14]), rtol=1e-5, atol=1e-6)
    assert not db.has_token_ids and not db.has_contexts and db.token_ids.tolist() == [-1] * 14
    ids, rows, center = db.context(3)
    assert ids.tolist() == [-1] and rows.tolist() == [3] and center == 0


def test_bad_input_messages():
    model, sae = make_model(), make_sae()
    tokens = random_windows(2, 6, seed=0)
    with pytest.raises(ValueError, match="unknown hook 'blocks.1.hook_nope'"):
        build_database(sae, model, tokens, "blocks.1.hook_nope", progress=False)
    with pytest.raises(ValueError, match="n_tokens=0 must be a positive integer"):
        build_database(sae, model, tokens, n_tokens=0, progress=False)
    with pytest.raises(ValueError, match=r"\[n_windows, seq\] integer tensor"):
        build_database(sae, model, tokens.float(), progress=False)
    with pytest.raises(ValueError, match="no token was stored"):
        build_database(sae, model, torch.full((2, 4), BOS), exclude_token_ids={BOS}, progress=False)
    with pytest.raises(TypeError, match="must be a saefast SAE"):
        build_database(torch.nn.Linear(2, 2), model, tokens, HOOK, progress=False)
    with pytest.raises(ValueError, match=r"expected \[batch, d_in=16\]"):
        build_database_from_activations(sae, [torch.randn(3, 7)], progress=False)
    with pytest.raises(ValueError, match="appears twice"):
        ActivationDatabase(torch.ones(2), torch.tensor([1, 1]), torch.tensor([0, 0]), 1, 3)
    with pytest.raises(ValueError, match=r"feature_ids must lie in \[0, d_sae=3\)"):
        ActivationDatabase(torch.ones(1), torch.tensor([3]), torch.tensor([0]), 1, 3)
    db = ActivationDatabase(torch.ones(1), torch.tensor([2]), torch.tensor([0]), 1, 3)
    with pytest.raises(ValueError, match=r"feature=5 must be in \[0, d_sae=3\)"):
        db.feature_activations(5)
    with pytest.raises(ValueError, match=r"token=1 must be in \[0, n_tokens=1\)"):
        db.token_activations(1)
