"""The classic SAE API's ``features`` (saefast.dense_features.DenseFeatures): the dense tensor for
every use, built only when read, differentiable like it; classic loops give the same numbers as
the plain dense implementation and build nothing dense; get_auxiliary_loss reuses the forward's
aux-K codes when it may and recomputes them when it may not."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

from saefast import BatchTopKSAE, SparseActs, TopKSAE, VanillaSAE, ops
from saefast.dense_features import DenseFeatures
from test_sae import PlainUserBatchTopK, _close, planted_batches, user_cfg


def _forward(cls=BatchTopKSAE, shape=(4, 8), seed=0, **cfg):
    sae = cls(user_cfg(**cfg))
    x = planted_batches(1, 32, 16, seed=seed, shape=shape)[0]
    x_recon, features = sae(x)
    return sae, x, x_recon, features


def test_queries_build_nothing_and_reads_build_the_dense_tensor_once(monkeypatch):
    sae, x, x_recon, features = _forward()
    built = []
    to_dense = SparseActs.to_dense
    monkeypatch.setattr(SparseActs, "to_dense", lambda self: built.append(1) or to_dense(self))
    assert isinstance(features, torch.Tensor) and isinstance(features, DenseFeatures)
    assert features.shape == (4, 8, 64) and features.size() == (4, 8, 64) and features.size(-1) == 64
    assert features.dim() == features.ndim == 3 and features.numel() == 4 * 8 * 64 and len(features) == 4
    assert features.dtype == torch.float32 and features.device == x.device and features.requires_grad
    assert features.is_floating_point() and not features.is_cuda
    sae.update_inactive_features(features)
    assert not built and not features.is_materialized
    first = features[0]
    assert built == [1] and features.is_materialized
    assert type(first) is torch.Tensor and first.shape == (8, 64)
    features.sum(), features * 2, repr(features)
    assert built == [1], "the dense tensor must be built once and kept"


def test_features_behave_as_the_dense_tensor():
    sae, x, x_recon, features = _forward(seed=1)
    dense = features.acts.to_dense().reshape(4, 8, 64)
    assert torch.equal(features, dense) and torch.equal(dense, features)
    assert repr(features) == repr(dense) and str(features) == str(dense)
    assert torch.equal(features[1, 2], dense[1, 2]) and torch.equal(features[..., 5:9], dense[..., 5:9])
    assert torch.equal(features[dense > 0], dense[dense > 0])
    for got in (features.detach(), features.cpu(), features.clone(), features.float(), features.contiguous()):
        assert type(got) is torch.Tensor and torch.equal(got, dense)
    assert not features.detach().requires_grad and features.detach().numpy().shape == (4, 8, 64)
    assert torch.equal(torch.cat([features, features]), torch.cat([dense, dense]))
    assert torch.equal(torch.stack([features, dense]), torch.stack([dense, dense]))
    assert torch.equal((features > 0).float().sum(-1), (dense > 0).float().sum(-1))
    assert torch.equal(features.reshape(-1, 64) @ sae.W_dec, dense.reshape(-1, 64) @ sae.W_dec)
    assert torch.equal(features.abs().mean(), dense.abs().mean()) and features.detach().max().item() == dense.max().item()
    assert [torch.equal(a, b) for a, b in zip(features, dense)] == [True] * 4
    assert features.is_contiguous() and features.stride() == dense.stride()
    buffer = io.BytesIO()
    torch.save(features.detach(), buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), dense)
    assert torch.equal(copy.deepcopy(features.detach()), dense)
    with torch.no_grad():
        features[0, 0, 0] = 7.0  # in place: later reads see it, as with a real tensor
    assert features[0, 0, 0].item() == 7.0 and float(features.acts.values.detach().max()) != 7.0


@pytest.mark.parametrize("first_read_without_grad", [False, True])
def test_autograd_through_features_equals_the_dense_version(first_read_without_grad):
    """A loss built on the features (L1, squares, slices) gives every weight the gradient it gets
    from the dense activations, also when the first read was under no_grad."""
    grads = []
    for lazy in (True, False):
        sae, x, x_recon, features = _forward(cls=VanillaSAE, seed=2, architecture="relu", top_k=None)
        f = features if lazy else features.acts.to_dense().reshape(features.shape)
        if first_read_without_grad:
            with torch.no_grad():
                (f > 0).float().mean()
        loss = f.abs().sum() + f.pow(2).mean() + 3 * f[..., :5].sum() + F.mse_loss(x_recon, x)
        assert loss.requires_grad
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0, msg=name)
    sae, x, x_recon, features = _forward(cls=VanillaSAE, seed=2, architecture="relu", top_k=None)
    (g,) = torch.autograd.grad(features.sum(), features.acts.values)
    assert torch.equal(g, torch.ones_like(g))
    with torch.inference_mode():
        _, features = sae(x)
    assert features.sum() >= 0


@pytest.mark.parametrize("shape,chunks", [((32,), 1), ((4, 8), 1), ((32,), 2)])
def test_classic_loop_runs_unchanged_with_the_same_numbers(shape, chunks):
    """The classic training loop (activations optionally in chunks, an L1 statistic and the
    sparsity read from the features, get_auxiliary_loss, update_inactive_features) gives the
    plain dense implementation's numbers step by step."""
    cfg = user_cfg()
    ours = BatchTopKSAE(cfg)
    plain = PlainUserBatchTopK(cfg, dict(ours.named_parameters()))
    opts = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=2e-3) for m in (ours, plain)]
    aux_seen = 0
    for step, x in enumerate(planted_batches(16, 32, 16, seed=9, shape=shape)):
        runs = []
        for sae, opt in zip((ours, plain), opts):
            parts = [sae(c) for c in x.chunk(chunks)]
            x_recon = torch.cat([p[0] for p in parts])
            features = torch.cat([p[1] for p in parts]) if chunks > 1 else parts[0][1]
            aux = sae.get_auxiliary_loss(x, x_recon)
            l1 = features.abs().sum(-1).mean()
            sparsity = (features > 0).float().sum(-1).mean()
            loss = F.mse_loss(x_recon, x) + aux
            opt.zero_grad()
            loss.backward()
            sae.project_decoder_gradients()
            runs.append([t.detach().clone() for t in (loss, aux, l1, sparsity, x_recon, sae.W_enc.grad, sae.W_dec.grad)])
            opt.step()
            sae.normalize_decoder()
            sae.update_inactive_features(features)
        aux_seen += float(runs[1][1]) > 0
        for what, a, b in zip(("loss", "aux", "l1", "sparsity", "x_recon", "grad W_enc", "grad W_dec"), *runs):
            _close(a, b, torch.float32, f"step {step} {what}")
        assert torch.equal(ours.num_batches_not_active.float(), plain.num_batches_not_active)
    assert aux_seen >= 5


def test_classic_batchtopk_loop_builds_nothing_dense_and_reuses_the_forward(monkeypatch):
    """sae(x) + get_auxiliary_loss + update_inactive_features: no SparseActs.to_dense, and the
    aux-K codes come out of the forward's encode and its one decode."""
    sae = BatchTopKSAE(user_cfg())
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=2e-3)
    monkeypatch.setattr(SparseActs, "to_dense", lambda self: pytest.fail("the classic loop went dense"))
    calls = {"auxk_encode": 0, "sparse_decode": 0, "topk_encode_with_aux": 0}
    for name in calls:
        def counted(*args, _name=name, _fn=getattr(ops, name), **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(ops, name, counted)
    fused_steps = 0
    for x in planted_batches(12, 32, 16, seed=10):
        before = dict(calls)
        x_recon, features = sae(x)
        loss = F.mse_loss(x_recon, x) + sae.get_auxiliary_loss(x, x_recon)
        opt.zero_grad()
        loss.backward()
        sae.project_decoder_gradients()
        opt.step()
        sae.normalize_decoder()
        sae.update_inactive_features(features)
        assert calls["auxk_encode"] == before["auxk_encode"], "get_auxiliary_loss encoded again"
        assert calls["sparse_decode"] == before["sparse_decode"] + 1, "one decode per step"
        fused_steps += calls["topk_encode_with_aux"] - before["topk_encode_with_aux"]
    assert fused_steps >= 5 and sae.count_dead_features() > 0


def test_get_auxiliary_loss_recomputes_when_the_forward_cannot_be_reused():
    """Another x (equal but not the same tensor), a changed dead set or changed weights: the aux-K
    loss is recomputed, and equals the one from the forward's codes where nothing changed."""
    def fresh():
        sae = BatchTopKSAE(user_cfg())
        sae.num_batches_not_active[::3] = 5
        x = planted_batches(1, 32, 16, seed=11)[0]
        return sae, x
    sae, x = fresh()
    x_recon, _ = sae(x)
    reused = sae.get_auxiliary_loss(x, x_recon)
    assert float(reused) > 0
    sae, x = fresh()
    x_recon, _ = sae(x)
    recomputed = sae.get_auxiliary_loss(x.clone(), x_recon)
    _close(reused, recomputed, torch.float32, "aux loss, reused vs recomputed")
    sae, x = fresh()
    x_recon, _ = sae(x)
    sae.num_batches_not_active[1::3] = 5  # more latents dead since the forward
    more_dead = sae.get_auxiliary_loss(x, x_recon)
    twin, _ = fresh()
    twin.num_batches_not_active[1::3] = 5
    _close(more_dead, twin.get_auxiliary_loss(x, x_recon.detach()), torch.float32, "aux loss with the new dead set")
    assert float(more_dead) != float(reused)
    sae, x = fresh()
    x_recon, _ = sae(x)
    with torch.no_grad():
        sae.W_enc.mul_(1.5)
    _close(sae.get_auxiliary_loss(x, x_recon), _aux_with_scaled_encoder(x, x_recon.detach()), torch.float32,
           "aux loss after the weights changed")


def _aux_with_scaled_encoder(x, x_recon):
    sae = BatchTopKSAE(user_cfg())
    sae.num_batches_not_active[::3] = 5
    with torch.no_grad():
        sae.W_enc.mul_(1.5)
    return sae.get_auxiliary_loss(x, x_recon)


def test_forward_stops_computing_aux_codes_nobody_asks_for(monkeypatch):
    """A loop that never calls get_auxiliary_loss pays for the forward's aux-K codes once; calling
    it with the last forward's output turns them on again."""
    sae = TopKSAE(user_cfg(architecture="topk"))
    sae.num_batches_not_active[::2] = 5
    calls = []
    fn = ops.topk_encode_with_aux
    monkeypatch.setattr(ops, "topk_encode_with_aux", lambda *a, **k: calls.append(1) or fn(*a, **k))
    xs = planted_batches(5, 32, 16, seed=12)
    for x in xs[:3]:
        x_recon, features = sae(x)
        F.mse_loss(x_recon, x).backward()
    assert len(calls) == 1
    x_recon, _ = sae(xs[3])
    sae.get_auxiliary_loss(xs[3], x_recon)
    sae(xs[4])
    assert len(calls) == 2


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_classic_loop_reuses_the_forward_with_the_same_numbers(skip):
    """A transcoder (d_out != d_in, with and without the skip connection): forward +
    get_auxiliary_loss(x, out, target) from the forward's aux-K codes gives the loss and gradients
    of the recomputed aux-K loss (another x tensor, equal values)."""
    from test_transcoder import make_transcoder

    def step(reuse):
        sae = make_transcoder("batchtopk", 16, 12, 64, 4, skip, seed=3)
        sae.num_batches_not_active[::2] = sae.config.n_batches_to_dead  # half the latents dead
        g = torch.Generator().manual_seed(5)
        x, target = torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 12, generator=g)
        out, features = sae(x)
        assert out.shape == (2, 9, 12) and features.shape == (2, 9, 64)
        aux = sae.get_auxiliary_loss(x if reuse else x.clone(), out, target)
        loss = F.mse_loss(out, target) + aux
        loss.backward()
        return aux.detach(), {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}

    calls = []
    auxk_encode = ops.auxk_encode
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "auxk_encode", lambda *a, **k: calls.append(1) or auxk_encode(*a, **k))
        aux_reused, grads_reused = step(reuse=True)
        assert not calls, "the forward's aux-K codes must be used"
        aux_again, grads_again = step(reuse=False)
        assert calls, "another x must recompute the aux-K codes"
    assert float(aux_reused) > 0
    _close(aux_reused, aux_again, torch.float32, "aux loss")
    assert grads_reused.keys() == grads_again.keys() and ("W_skip" in grads_reused) == skip
    for name in grads_reused:
        _close(grads_reused[name], grads_again[name], torch.float32, f"grad {name}")
