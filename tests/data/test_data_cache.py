"""saefast.data.cache: shards + manifest round-trip, shuffled streaming, exact resume, safe writes."""
import pytest

datasets = pytest.importorskip("datasets")  # the lent GPU machine has no datasets
pytest.importorskip("transformer_lens")

import json

import torch
from safetensors.torch import load_file

from data_helpers import make_model, make_texts, make_tokenizer
from saefast.data.cache import CachedActivationSource, cache_activations, read_manifest
from saefast.data.source import ModelActivationSource
from saefast.data.tokens import TokenWindows

HOOK = "blocks.0.hook_resid_post"


class TensorSource:
    """A minimal activation source over a fixed tensor (the trainer's protocol)."""

    def __init__(self, x, batch_size, fail_after=None):
        self.x, self.batch_size, self.d_in, self.i, self.fail_after = x, batch_size, x.shape[1], 0, fail_after

    def __iter__(self):
        return self

    def __next__(self):
        if self.fail_after is not None and self.i >= self.fail_after:
            raise RuntimeError("source broke")
        lo = self.i * self.batch_size
        if lo >= self.x.shape[0]:
            raise StopIteration
        self.i += 1
        return self.x[lo:lo + self.batch_size]

    def state_dict(self):
        return {"i": self.i, "rng": torch.arange(3)}  # not JSON: goes to source_state.pt


def rows(n, d=6, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_round_trip_in_order(tmp_path):
    x = rows(103)
    out = cache_activations(TensorSource(x, 10), tmp_path / "cache", n_tokens=95, shard_tokens=20, progress=False)
    manifest = read_manifest(out)
    assert manifest["n_tokens"] == 95 and manifest["d_in"] == 6 and manifest["dtype"] == "float32"
    assert [s["n_tokens"] for s in manifest["shards"]] == [20, 20, 20, 20, 15]
    assert manifest["source_state"]["i"] == 10 and torch.equal(manifest["source_state"]["rng"], torch.arange(3))
    assert torch.equal(load_file(str(out / "shard_00001.safetensors"))["activations"], x[20:40])
    src = CachedActivationSource(out, batch_size=5, shuffle=False, read_tokens=7, buffer_tokens=15)
    assert src.d_in == 6
    assert torch.equal(torch.cat(list(src)), x[:95])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folders left


@pytest.mark.parametrize("background", [False, True])
def test_shuffled_reads_cover_every_row_and_resume_exactly(tmp_path, background):
    x = rows(120, seed=1)
    out = cache_activations(TensorSource(x, 8), tmp_path / "c", n_tokens=120, shard_tokens=25, progress=False)

    def build(seed=3):
        return CachedActivationSource(out, batch_size=6, seed=seed, read_tokens=9, buffer_tokens=30,
                                      background=background)

    full = torch.cat(list(build()))
    assert full.shape == (120, 6)
    assert torch.equal(full[full[:, 0].argsort()], x[x[:, 0].argsort()])  # same rows, new order
    assert not torch.equal(full, x)
    assert torch.equal(torch.cat(list(build())), full)  # deterministic given the seed
    assert not torch.equal(torch.cat(list(build(seed=4))), full)
    for k in (0, 3, 5, 11, 20):
        first = build()
        head = [next(first) for _ in range(k)]
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        second = build()
        second.load_state_dict(state)
        assert torch.equal(torch.cat(head + list(second)), full), f"resume after {k} batches"


def test_repeat_ranks_and_bf16(tmp_path):
    x = rows(60, seed=2)
    out = cache_activations(TensorSource(x, 7), tmp_path / "c", n_tokens=60, shard_tokens=16, dtype="bfloat16",
                            progress=False)
    assert read_manifest(out)["dtype"] == "bfloat16"
    parts = [torch.cat(list(CachedActivationSource(out, 1, shuffle=False, rank=r, world_size=2)))
             for r in range(2)]
    both = torch.cat(parts)
    assert both.dtype == torch.float32 and both.shape == (60, 6)
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, x.bfloat16().float().tolist()))
    looping = CachedActivationSource(out, batch_size=4, repeat=True, buffer_tokens=8)
    seen = torch.cat([next(looping) for _ in range(40)])  # 160 rows > one pass of 60
    assert seen.shape == (160, 6) and looping.state_dict()["buffer"]["start"]["stream"]["epoch"] >= 2


def test_cache_from_a_model_source_keeps_token_columns(tmp_path):
    model = make_model()
    windows = TokenWindows(datasets.Dataset.from_dict({"text": make_texts(10, seed=4)}), make_tokenizer(), 10)
    source = ModelActivationSource(model, HOOK, windows, batch_size=8, buffer_tokens=32, with_tokens=True)
    out = cache_activations(source, tmp_path / "m", n_tokens=50, shard_tokens=16, progress=False,
                            metadata={"hook": HOOK})
    manifest = read_manifest(out)
    assert manifest["columns"] == ["activations", "token_ids", "window_ids", "positions"]
    assert manifest["metadata"] == {"hook": HOOK}
    # The recorded source position resumes the model source right after the cached tokens.
    source.close()
    resumed = ModelActivationSource(model, HOOK, TokenWindows(datasets.Dataset.from_dict(
        {"text": make_texts(10, seed=4)}), make_tokenizer(), 10), batch_size=8, buffer_tokens=32, with_tokens=True)
    resumed.load_state_dict(manifest["source_state"])
    cached = CachedActivationSource(out, batch_size=5, shuffle=False, with_tokens=True)
    batches = list(cached)
    acts = torch.cat([b.acts for b in batches])
    win = torch.cat([b.window_ids for b in batches])
    pos = torch.cat([b.positions for b in batches])
    _, cache = model.run_with_cache(torch.stack(list(TokenWindows(datasets.Dataset.from_dict(
        {"text": make_texts(10, seed=4)}), make_tokenizer(), 10))))
    torch.testing.assert_close(acts, cache[HOOK][win, pos], rtol=1e-5, atol=1e-5)
    later = next(resumed)
    assert not set((later.window_ids * 10 + later.positions).tolist()) & set((win * 10 + pos).tolist())


def test_refuses_to_overwrite_and_cleans_up_on_failure(tmp_path):
    x = rows(40)
    out = cache_activations(TensorSource(x, 10), tmp_path / "c", n_tokens=40, shard_tokens=10, progress=False)
    before = load_file(str(out / "shard_00000.safetensors"))["activations"]
    with pytest.raises(ValueError, match="already exists and is not empty; pass overwrite=True"):
        cache_activations(TensorSource(x, 10), out, n_tokens=40, shard_tokens=10, progress=False)
    with pytest.raises(RuntimeError, match="source broke"):
        cache_activations(TensorSource(2 * x, 10, fail_after=2), out, n_tokens=40, shard_tokens=10,
                          overwrite=True, progress=False)
    assert torch.equal(load_file(str(out / "shard_00000.safetensors"))["activations"], before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    cache_activations(TensorSource(2 * x, 10), out, n_tokens=40, shard_tokens=10, overwrite=True, progress=False)
    assert torch.equal(load_file(str(out / "shard_00000.safetensors"))["activations"], 2 * before)


def test_bad_input(tmp_path):
    x = rows(20)
    with pytest.raises(ValueError, match="shard_tokens=0 must be a positive integer"):
        cache_activations(TensorSource(x, 5), tmp_path / "a", n_tokens=10, shard_tokens=0)
    with pytest.raises(ValueError, match="dtype='int8' must be one of"):
        cache_activations(TensorSource(x, 5), tmp_path / "a", n_tokens=10, shard_tokens=5, dtype="int8")
    with pytest.raises(ValueError, match="yielded no activations"):
        cache_activations(TensorSource(x[:0], 5), tmp_path / "a", n_tokens=10, shard_tokens=5, progress=False)
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite activations"):
        cache_activations(TensorSource(bad, 5), tmp_path / "a", n_tokens=10, shard_tokens=5, progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="is not an activation cache: it has no manifest.json"):
        CachedActivationSource(tmp_path, batch_size=4)
    out = cache_activations(TensorSource(x, 5), tmp_path / "b", n_tokens=20, shard_tokens=5, progress=False)
    with pytest.raises(ValueError, match=r"with_tokens=True but the cache .* has no \['token_ids'"):
        CachedActivationSource(out, batch_size=4, with_tokens=True)
    state = CachedActivationSource(out, batch_size=4).state_dict()
    other = cache_activations(TensorSource(x, 5), tmp_path / "o", n_tokens=15, shard_tokens=5, progress=False)
    with pytest.raises(ValueError, match="saved source read a cache with n_tokens=20"):
        CachedActivationSource(other, batch_size=4).load_state_dict(state)
    (out / "shard_00002.safetensors").unlink()
    with pytest.raises(ValueError, match=r"incomplete: shard files \['shard_00002.safetensors'\] are missing"):
        CachedActivationSource(out, batch_size=4)


def test_overwrite_keeps_folders_saefast_did_not_write(tmp_path):
    x = rows(20)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.csv").write_text("keep")
    with pytest.raises(ValueError, match="files saefast did not write"):
        cache_activations(TensorSource(x, 10), mine, n_tokens=20, shard_tokens=10, overwrite=True, progress=False)
    assert (mine / "results.csv").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
