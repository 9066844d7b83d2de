"""SAE classes: both drop-in APIs against plain dense PyTorch of the same semantics, training on
planted features, the inference threshold, folding, bookkeeping and bad input.

The plain implementations below are written from the semantics (the classic SAE API and the
BatchTopK reference code's training step), dense and unoptimised; saefast runs the sparse ops.
"""
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saefast
from saefast import BatchTopKSAE, JumpReLUSAE, SAEConfig, SparseActs, TopKSAE, VanillaSAE, create_sae

from jumprelu_oracle import DenseJumpReLU, DenseStep


TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}


def planted_batches(n_batches, batch, d_in, n_features=24, active=3, seed=0, shape=None, dtype=torch.float32):
    """Sparse non-negative combinations of a fixed random unit-norm dictionary, plus small noise."""
    gen = torch.Generator().manual_seed(seed)
    true = torch.randn(n_features, d_in, generator=gen)
    true = true / true.norm(dim=1, keepdim=True)
    out = []
    for _ in range(n_batches):
        scores = torch.rand(batch, n_features, generator=gen)
        idx = scores.topk(active, dim=1).indices
        coef = torch.zeros(batch, n_features).scatter(1, idx, 0.5 + torch.rand(batch, active, generator=gen))
        x = coef @ true + 0.01 * torch.randn(batch, d_in, generator=gen)
        out.append((x.reshape(*shape, d_in) if shape else x).to(dtype))
    return out


def ref_cfg(**overrides):
    cfg = dict(act_size=16, dict_size=64, top_k=4, top_k_aux=8, aux_penalty=1 / 32, n_batches_to_dead=2,
               input_unit_norm=False, l1_coeff=0.0, seed=7, dtype=torch.float32, device="cpu")
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------------------------------------------
# Plain dense PyTorch of the reference code's semantics
# ------------------------------------------------------------------------------------------------

class PlainReferenceSAE(nn.Module):
    """The BatchTopK reference code's BatchTopKSAE / TopKSAE / VanillaSAE, dense."""

    def __init__(self, cfg, kind):
        super().__init__()
        self.cfg, self.kind = cfg, kind
        torch.manual_seed(cfg["seed"])
        self.b_dec = nn.Parameter(torch.zeros(cfg["act_size"]))
        self.b_enc = nn.Parameter(torch.zeros(cfg["dict_size"]))
        self.W_enc = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(cfg["act_size"], cfg["dict_size"])))
        self.W_dec = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(cfg["dict_size"], cfg["act_size"])))
        self.W_dec.data[:] = self.W_enc.t().data
        self.W_dec.data[:] = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True)
        self.num_batches_not_active = torch.zeros(cfg["dict_size"])
        self.to(cfg["dtype"])

    def preprocess(self, x):
        if self.cfg.get("input_unit_norm", False):
            mean = x.mean(dim=-1, keepdim=True)
            x = x - mean
            std = x.std(dim=-1, keepdim=True)
            return x / (std + 1e-5), mean, std
        return x, None, None

    def forward(self, x):
        x, mean, std = self.preprocess(x)
        x_cent = x - self.b_dec
        if self.kind == "vanilla":
            acts = F.relu(x_cent @ self.W_enc + self.b_enc)
            acts_topk = acts
        else:
            acts = F.relu(x_cent @ self.W_enc)
            if self.kind == "batchtopk":
                top = torch.topk(acts.flatten(), self.cfg["top_k"] * x.shape[0], dim=-1)
                acts_topk = torch.zeros_like(acts.flatten()).scatter(-1, top.indices, top.values).reshape(acts.shape)
            else:
                top = torch.topk(acts, self.cfg["top_k"], dim=-1)
                acts_topk = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
        x_rec = acts_topk @ self.W_dec + self.b_dec
        self.num_batches_not_active += (acts_topk.sum(0) == 0).float()
        self.num_batches_not_active[acts_topk.sum(0) > 0] = 0
        l2_loss = (x_rec.float() - x.float()).pow(2).mean()
        l1_norm = acts_topk.float().abs().sum(-1).mean()
        l1_loss = self.cfg["l1_coeff"] * l1_norm
        l0_norm = (acts_topk > 0).float().sum(-1).mean()
        out = dict(l2_loss=l2_loss, l1_norm=l1_norm, l1_loss=l1_loss, l0_norm=l0_norm,
                   num_dead_features=(self.num_batches_not_active > self.cfg["n_batches_to_dead"]).sum())
        loss = l2_loss + l1_loss
        if self.kind != "vanilla":
            out["aux_loss"] = self.aux_loss(x, x_rec, acts)
            loss = loss + out["aux_loss"]
        out["loss"] = loss
        out["sae_out"] = x_rec * std + mean if mean is not None else x_rec
        out["feature_acts"] = acts_topk
        return out

    def aux_loss(self, x, x_rec, acts):
        dead = self.num_batches_not_active >= self.cfg["n_batches_to_dead"]
        if dead.sum() == 0:
            return torch.tensor(0, dtype=x.dtype)
        residual = x.float() - x_rec.float()
        top = torch.topk(acts[:, dead], min(self.cfg["top_k_aux"], int(dead.sum())), dim=-1)
        acts_aux = torch.zeros_like(acts[:, dead]).scatter(-1, top.indices, top.values)
        x_aux = acts_aux @ self.W_dec[dead]
        return self.cfg["aux_penalty"] * (x_aux.float() - residual.float()).pow(2).mean()

    @torch.no_grad()
    def make_decoder_weights_and_grad_unit_norm(self):
        W_normed = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True)
        self.W_dec.grad -= (self.W_dec.grad * W_normed).sum(-1, keepdim=True) * W_normed
        self.W_dec.data = W_normed


def _close(a, b, dtype, what):
    torch.testing.assert_close(torch.as_tensor(a).to(dtype), torch.as_tensor(b).to(dtype), **TOL[dtype], msg=what)


@pytest.mark.parametrize("kind,cls,overrides", [
    ("batchtopk", BatchTopKSAE, {}),
    ("batchtopk", BatchTopKSAE, {"input_unit_norm": True, "l1_coeff": 1e-3}),
    ("topk", TopKSAE, {}),
    ("vanilla", VanillaSAE, {"l1_coeff": 3e-3}),
])
def test_reference_dict_api_matches_plain_training_loop(kind, cls, overrides):
    cfg = ref_cfg(**overrides)
    ours, plain = cls(dict(cfg)), PlainReferenceSAE(cfg, kind)
    assert ours.cfg == cfg and ours.reference_mode
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):  # same seed -> the reference code's exact init
        assert torch.equal(getattr(ours, name), getattr(plain, name)), name
    opt_a = torch.optim.Adam(ours.parameters(), lr=2e-3, betas=(0.9, 0.99))
    opt_b = torch.optim.Adam(plain.parameters(), lr=2e-3, betas=(0.9, 0.99))
    aux_seen = 0
    for step, x in enumerate(planted_batches(24, 32, 16, seed=1)):
        out_a, out_b = ours(x), plain(x)
        keys = ["loss", "l2_loss", "l1_loss", "l1_norm", "l0_norm", "num_dead_features"]
        keys += ["aux_loss"] if kind != "vanilla" else []
        for key in keys:
            _close(out_a[key], out_b[key], torch.float32, f"step {step} {key}")
        _close(out_a["sae_out"], out_b["sae_out"], torch.float32, f"step {step} sae_out")
        _close(out_a["feature_acts"], out_b["feature_acts"], torch.float32, f"step {step} feature_acts")
        if kind != "vanilla":
            aux_seen += float(out_b["aux_loss"].detach()) > 0
        out_a["loss"].backward()
        out_b["loss"].backward()
        ours.make_decoder_weights_and_grad_unit_norm()
        plain.make_decoder_weights_and_grad_unit_norm()
        for name in ("W_enc", "W_dec", "b_dec") + (("b_enc",) if kind == "vanilla" else ()):
            _close(getattr(ours, name).grad, getattr(plain, name).grad, torch.float32, f"step {step} grad {name}")
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
    assert torch.equal(ours.num_batches_not_active.float(), plain.num_batches_not_active)
    if kind != "vanilla":
        assert aux_seen >= 5, "the aux-K loss never ran; the test would not cover it"
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(ours, name), getattr(plain, name), rtol=1e-4, atol=1e-5)


def test_reference_output_builds_dense_features_only_on_access():
    sae = BatchTopKSAE(ref_cfg())
    out = sae(planted_batches(1, 8, 16)[0])
    assert "feature_acts" in out and dict.__contains__(out, "feature_acts") is False
    assert isinstance(out["acts"], SparseActs)
    dense = out.get("feature_acts")
    assert dense.shape == (8, 64) and torch.equal(dense, out["acts"].to_dense())
    assert out["feature_acts"] is dense and out.get("missing", 1) == 1
    logged = {k: v.item() for k, v in out.items() if isinstance(v, torch.Tensor) and v.dim() == 0}
    assert {"loss", "l2_loss", "l1_loss", "l0_norm", "l1_norm", "aux_loss", "num_dead_features"} <= set(logged)


# ------------------------------------------------------------------------------------------------
# Plain dense PyTorch of the classic SAE API's semantics
# ------------------------------------------------------------------------------------------------

class PlainUserBatchTopK(nn.Module):
    """The user's BatchTopKSAE, dense: x - b_dec, relu(@ W_enc) (no b_enc), BatchTopK over all
    tokens (tokens * k kept), decode; aux-K on the detached residual with the dead latents."""

    def __init__(self, cfg, weights):
        super().__init__()
        self.cfg = cfg
        for name in ("W_enc", "W_dec", "b_dec"):
            setattr(self, name, nn.Parameter(weights[name].detach().clone()))
        self.num_batches_not_active = torch.zeros(cfg.d_sae)

    def _acts(self, x2):
        return F.relu((x2 - self.b_dec) @ self.W_enc)

    def forward(self, x):
        x2 = x.reshape(-1, self.cfg.d_in)
        acts = self._acts(x2)
        top = torch.topk(acts.flatten(), self.cfg.top_k * x2.shape[0])
        sparse = torch.zeros_like(acts.flatten()).scatter(-1, top.indices, top.values).reshape(acts.shape)
        x_recon = sparse @ self.W_dec + self.b_dec
        return x_recon.reshape(x.shape), sparse.reshape(*x.shape[:-1], self.cfg.d_sae)

    def get_auxiliary_loss(self, x, x_recon):
        dead = self.num_batches_not_active >= self.cfg.n_batches_to_dead
        if not dead.any():
            return torch.zeros(())
        x2 = x.reshape(-1, self.cfg.d_in)
        acts = self._acts(x2)[:, dead]
        top = torch.topk(acts, min(self.cfg.top_k_aux, int(dead.sum())), dim=-1)
        aux = torch.zeros_like(acts).scatter(-1, top.indices, top.values) @ self.W_dec[dead]
        residual = (x2 - x_recon.reshape(-1, self.cfg.d_in)).detach()
        return self.cfg.aux_penalty * (aux - residual).pow(2).mean()

    @torch.no_grad()
    def project_decoder_gradients(self):
        unit = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True)
        self.W_dec.grad -= (self.W_dec.grad * unit).sum(-1, keepdim=True) * unit

    @torch.no_grad()
    def normalize_decoder(self):
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)

    def update_inactive_features(self, features):
        fired = features.reshape(-1, self.cfg.d_sae).sum(0) > 0
        self.num_batches_not_active += (~fired).float()
        self.num_batches_not_active[fired] = 0


def user_cfg(**overrides):
    kw = dict(d_in=16, d_sae=64, top_k=4, n_batches_to_dead=2, device="cpu", seed=3)
    kw.update(overrides)
    return SAEConfig(**kw)


def test_user_init_matches_design():
    cfg = user_cfg()
    sae = BatchTopKSAE(cfg)
    gen = torch.Generator().manual_seed(3)
    W_enc = nn.init.kaiming_uniform_(torch.empty(16, 64), generator=gen)
    assert torch.equal(sae.W_enc, W_enc)
    W_dec = W_enc.t().contiguous()
    assert torch.equal(sae.W_dec, W_dec / W_dec.norm(dim=-1, keepdim=True))
    assert not sae.b_enc.requires_grad and torch.count_nonzero(sae.b_enc) == 0
    assert torch.count_nonzero(sae.b_dec) == 0
    assert cfg.top_k_aux == 2 and cfg.hook_spec == "blocks.9.hook_resid_post"
    assert cfg.torch_dtype() == torch.float32


@pytest.mark.parametrize("shape", [(32,), (4, 8)])
def test_user_api_training_loop_matches_plain(shape):
    cfg = user_cfg()
    ours = BatchTopKSAE(cfg)
    plain = PlainUserBatchTopK(cfg, dict(ours.named_parameters()))
    params_a = [p for p in ours.parameters() if p.requires_grad]
    opt_a = torch.optim.Adam(params_a, lr=2e-3)
    opt_b = torch.optim.Adam(plain.parameters(), lr=2e-3)
    aux_seen = 0
    for step, x in enumerate(planted_batches(22, 32, 16, seed=2, shape=shape)):
        runs = []
        for sae, opt in ((ours, opt_a), (plain, opt_b)):
            x_recon, features = sae(x)
            assert x_recon.shape == x.shape and features.shape == (*shape, 64)
            aux = sae.get_auxiliary_loss(x, x_recon)
            loss = F.mse_loss(x_recon, x) + aux
            opt.zero_grad()
            loss.backward()
            sae.project_decoder_gradients()
            runs.append((loss.detach(), aux.detach(), x_recon.detach(), features.detach(),
                         {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}))
            opt.step()
            sae.normalize_decoder()
            sae.update_inactive_features(features)
        (la, aa, ra, fa, ga), (lb, ab, rb, fb, gb) = runs
        aux_seen += float(ab) > 0
        _close(la, lb, torch.float32, f"step {step} loss")
        _close(aa, ab, torch.float32, f"step {step} aux")
        _close(ra, rb, torch.float32, f"step {step} x_recon")
        _close(fa, fb, torch.float32, f"step {step} features")
        assert set(ga) == {"W_enc", "W_dec", "b_dec"} == set(gb)
        for name in ga:
            _close(ga[name], gb[name], torch.float32, f"step {step} grad {name}")
    assert aux_seen >= 5
    assert torch.equal(ours.num_batches_not_active.float(), plain.num_batches_not_active)
    for name in ("W_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(ours, name), getattr(plain, name), rtol=1e-4, atol=1e-5)
    assert ours.count_dead_features() == int((plain.num_batches_not_active >= 2).sum())
    assert ours.dead_feature_percentage() == pytest.approx(100 * ours.count_dead_features() / 64)


def test_training_forward_matches_plain_and_stays_sparse(monkeypatch):
    cfg = user_cfg()
    ours = BatchTopKSAE(cfg)
    plain = PlainUserBatchTopK(cfg, dict(ours.named_parameters()))
    opt_a = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=2e-3)
    opt_b = torch.optim.Adam(plain.parameters(), lr=2e-3)
    # The training path must not build a dense [B, d_sae] tensor: SparseActs.to_dense is its only way.
    monkeypatch.setattr(SparseActs, "to_dense", lambda self: pytest.fail("training_forward went dense"))
    for step, x in enumerate(planted_batches(22, 32, 16, seed=4)):
        out = ours.training_forward(x)
        x_recon, features = plain(x)
        aux = plain.get_auxiliary_loss(x, x_recon)
        _close(out["mse_loss"], F.mse_loss(x_recon, x), torch.float32, f"step {step} mse")
        _close(out["aux_loss"], aux, torch.float32, f"step {step} aux")
        _close(out["loss"], F.mse_loss(x_recon, x) + aux, torch.float32, f"step {step} loss")
        assert float(out["sparsity_loss"]) == 0.0
        assert float(out["l0"]) == pytest.approx(float((features > 0).sum(-1).float().mean()))
        _close(out["x_recon"], x_recon, torch.float32, f"step {step} x_recon")
        for sae, opt, loss in ((ours, opt_a, out["loss"]), (plain, opt_b, F.mse_loss(x_recon, x) + aux)):
            opt.zero_grad()
            loss.backward()
            sae.project_decoder_gradients()
            opt.step()
            sae.normalize_decoder()
        plain.update_inactive_features(features)
        assert torch.equal(ours.num_batches_not_active.float(), plain.num_batches_not_active)
    for name in ("W_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(ours, name), getattr(plain, name), rtol=1e-4, atol=1e-5)


def test_classic_loop_reads_features_from_training_forward_which_builds_them_only_then(monkeypatch):
    """A classic loop passes out["features"] to update_inactive_features: the entry is the dense
    [batch, (seq,) d_sae] activations, built on that read only, and the counters match the plain
    dense implementation step by step."""
    cfg = user_cfg()
    ours = BatchTopKSAE(cfg)
    plain = PlainUserBatchTopK(cfg, dict(ours.named_parameters()))
    opt_a = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=2e-3)
    opt_b = torch.optim.Adam(plain.parameters(), lr=2e-3)
    built = []
    to_dense = SparseActs.to_dense
    monkeypatch.setattr(SparseActs, "to_dense", lambda self: built.append(self.n_rows) or to_dense(self))
    for step, x in enumerate(planted_batches(12, 32, 16, seed=6, shape=(4, 8))):
        out = ours.training_forward(x, update_stats=False)
        assert "features" in out and not built, "training_forward built dense features before they were read"
        logged = {k: v for k, v in out.items()}  # logging / copying must not build them either
        assert "features" not in logged and not built
        features = out["features"]
        assert built == [32] and out.get("features") is features
        built.clear()
        x_recon, plain_features = plain(x)
        assert features.shape == (4, 8, 64)
        _close(features, plain_features, torch.float32, f"step {step} features")
        for sae, opt, loss in ((ours, opt_a, out["loss"]),
                               (plain, opt_b, F.mse_loss(x_recon, x) + plain.get_auxiliary_loss(x, x_recon))):
            opt.zero_grad()
            loss.backward()
            sae.project_decoder_gradients()
            opt.step()
            sae.normalize_decoder()
        ours.update_inactive_features(features)
        plain.update_inactive_features(plain_features)
        assert torch.equal(ours.num_batches_not_active.float(), plain.num_batches_not_active)
    assert ours.count_dead_features() > 0, "no latent died; the counters were not exercised"
    # the sparse codes give the same update as the dense features
    other = BatchTopKSAE(cfg)
    x = planted_batches(1, 32, 16, seed=7)[0]
    out = other.training_forward(x, update_stats=False)
    twin = BatchTopKSAE(cfg)
    other.update_inactive_features(out["acts"])
    twin.update_inactive_features(out["features"])
    assert torch.equal(other.num_batches_not_active, twin.num_batches_not_active)


def test_features_entry_is_differentiable():
    """An L1 term on out["features"] (as classic loops add) gives the same gradients as on the sparse values."""
    cfg = user_cfg(architecture="relu", top_k=None)
    x = planted_batches(1, 8, 16, seed=8)[0]
    grads = []
    for use_dense in (True, False):
        sae = VanillaSAE(cfg)
        out = sae.training_forward(x)
        l1 = out["features"].abs().sum() if use_dense else out["acts"].values.abs().sum()
        l1.backward()
        grads.append(sae.W_enc.grad.clone())
    assert grads[0].abs().sum() > 0
    _close(grads[0], grads[1], torch.float32, "W_enc grad through features")


def test_classic_base_class_name_torch_dtype_and_initialize_weights():
    assert saefast.SAE is saefast.sae.BaseSAE and "SAE" in saefast.__all__
    assert type(saefast.SAE(user_cfg())) is BatchTopKSAE
    assert type(saefast.SAE(user_cfg(architecture="relu", top_k=None))) is VanillaSAE
    assert user_cfg(dtype="bfloat16").torch_dtype() is torch.bfloat16
    assert user_cfg(dtype=torch.float16).torch_dtype() is torch.float16
    with pytest.raises(TypeError, match="SAEConfig"):
        saefast.SAE(None)
    sae = BatchTopKSAE(user_cfg())
    fresh = BatchTopKSAE(user_cfg())
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=1e-2)
    for x in planted_batches(3, 16, 16):
        out = sae.training_forward(x)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        sae.b_enc.add_(1.0)
    assert not torch.equal(sae.W_enc, fresh.W_enc)
    sae.initialize_weights()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(sae, name), getattr(fresh, name)), name
    assert torch.count_nonzero(sae.b_enc) == 0 and torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64))


# ------------------------------------------------------------------------------------------------
# JumpReLU against a dense straight-through implementation (SAELens / Rajamanoharan et al.)
# ------------------------------------------------------------------------------------------------

def test_jumprelu_losses_and_gradients_match_dense_ste():
    torch.manual_seed(0)
    eps, l0_coef = 0.2, 0.05
    cfg = SAEConfig(d_in=16, d_sae=48, architecture="jumprelu", l1_coefficient=l0_coef, jumprelu_bandwidth=eps,
                    device="cpu", seed=5)
    sae = JumpReLUSAE(cfg)
    with torch.no_grad():
        sae.threshold.copy_(0.3 + 0.3 * torch.rand(48))  # > eps / 2: the band never reaches pre <= 0
        sae.b_enc.copy_(0.2 * torch.randn(48))
        sae.b_dec.copy_(0.1 * torch.randn(16))
    x = 2 * planted_batches(1, 40, 16, seed=6)[0]
    out = sae.training_forward(x)
    out["loss"].backward()

    p = {n: t.detach().clone().requires_grad_() for n, t in sae.named_parameters()}
    pre = F.relu((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
    feats = DenseJumpReLU.apply(pre, p["threshold"], eps)
    x_hat = feats @ p["W_dec"] + p["b_dec"]
    mse = (x_hat - x).pow(2).mean()
    l0 = DenseStep.apply(pre, p["threshold"], eps).sum(-1).mean()
    (mse + l0_coef * l0).backward()
    band = ((pre - p["threshold"]).abs() < eps / 2).sum()
    assert band > 20, "too few entries near the thresholds to exercise the estimator"
    _close(out["mse_loss"], mse, torch.float32, "mse")
    _close(out["sparsity_loss"], l0_coef * l0, torch.float32, "l0 penalty")
    _close(out["l0"], (feats > 0).sum(-1).float().mean(), torch.float32, "l0")
    _close(out["acts"].to_dense(), feats, torch.float32, "features")
    for name, param in sae.named_parameters():
        assert param.grad is not None, name
        _close(param.grad, p[name].grad, torch.float32, f"grad {name}")
    assert p["threshold"].grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Every variant learns a planted dictionary
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,extra", [
    ("batchtopk", dict(top_k=3)),
    ("topk", dict(top_k=3)),
    ("relu", dict(l1_coefficient=3e-3)),
    ("jumprelu", dict(l1_coefficient=1e-3, jumprelu_bandwidth=0.05, jumprelu_init_threshold=0.05)),
])
def test_every_variant_trains_on_planted_features(arch, extra):
    cfg = SAEConfig(d_in=16, d_sae=48, architecture=arch, n_batches_to_dead=5, device="cpu", seed=11, **extra)
    sae = create_sae(cfg)
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=4e-3)
    losses = []
    for x in planted_batches(70, 64, 16, seed=12):
        out = sae.training_forward(x)
        assert torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        sae.project_decoder_gradients()
        opt.step()
        sae.normalize_decoder()
        losses.append(float(out["mse_loss"].detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (arch, first, last)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)
    assert 0 < float(out["l0"]) < 48


# ------------------------------------------------------------------------------------------------
# BatchTopK inference threshold
# ------------------------------------------------------------------------------------------------

def test_batchtopk_running_threshold_and_inference():
    lr = 0.2
    sae = BatchTopKSAE(user_cfg(topk_threshold_lr=lr))
    assert sae.inference_threshold is None and sae.topk_threshold.dtype == torch.float32
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=2e-3)
    expected = None
    for x in planted_batches(12, 32, 16, seed=8):
        out = sae.training_forward(x)
        kept_min = float(out["acts"].values.detach().min())
        expected = kept_min if expected is None else (1 - lr) * expected + lr * kept_min
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sae.normalize_decoder()
    assert sae.inference_threshold == pytest.approx(expected, rel=1e-5)

    sae.eval()
    x = planted_batches(1, 20, 16, seed=9)[0]
    acts = sae.encode_sparse(x)
    pre = F.relu((x - sae.b_dec) @ sae.W_enc).detach()
    dense = pre * (pre > sae.inference_threshold)
    _close(acts.to_dense(), dense, torch.float32, "eval codes")
    assert acts.nnz != 20 * 4  # not BatchTopK's fixed budget any more
    single, batched = sae.encode(x[3:4])[0], sae.encode(x)[3]  # a token's code does not depend on its batch
    assert torch.equal(single > 0, batched > 0)
    _close(single, batched, torch.float32, "single vs batched")
    _close(sae.reconstruct(x), dense @ sae.W_dec + sae.b_dec, torch.float32, "eval recon")
    # eval() leaves the counters and the threshold alone
    before = (sae.topk_threshold.clone(), sae.num_batches_not_active.clone())
    sae.training_forward(x)
    sae(x)
    assert torch.equal(before[0], sae.topk_threshold) and torch.equal(before[1], sae.num_batches_not_active)

    sae.train()  # training mode keeps exact BatchTopK
    assert sae.encode_sparse(x).nnz == 20 * 4


def test_batchtopk_eval_without_threshold_warns_and_falls_back(caplog):
    sae = BatchTopKSAE(user_cfg()).eval()
    x = planted_batches(1, 10, 16)[0]
    with caplog.at_level(logging.WARNING, logger="saefast.sae"):
        acts = sae.encode_sparse(x)
    assert acts.nnz == 40 and "no learned threshold" in caplog.text


def test_thresholds_stay_fp32_when_the_weights_change_dtype():
    sae = BatchTopKSAE(user_cfg())
    sae.update_threshold(torch.tensor(0.123456789))
    sae.to(torch.bfloat16)
    assert sae.W_enc.dtype == torch.bfloat16 and sae.topk_threshold.dtype == torch.float32
    assert float(sae.topk_threshold) == float(torch.tensor(0.123456789))
    jump = JumpReLUSAE(SAEConfig(d_in=8, d_sae=16, architecture="jumprelu", device="cpu", dtype="bfloat16"))
    assert jump.threshold.dtype == torch.float32 and jump.W_enc.dtype == torch.bfloat16
    jump.half()
    assert jump.threshold.dtype == torch.float32
    x = torch.randn(6, 8, dtype=torch.float16)
    assert jump.training_forward(x)["x_recon"].dtype == torch.float16


# ------------------------------------------------------------------------------------------------
# Input scale folding and input_unit_norm
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["batchtopk", "topk", "relu", "jumprelu"])
def test_fold_input_scale(arch):
    scale = 3.7
    cfg = SAEConfig(d_in=16, d_sae=48, architecture=arch, top_k=4, device="cpu", seed=2,
                    jumprelu_init_threshold=0.2)
    sae = create_sae(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(0.3 * torch.randn(16))
        sae.b_enc.copy_(0.1 * torch.randn(48))
    if arch == "batchtopk":
        sae.update_threshold(torch.tensor(0.4))
    sae.eval()
    x = planted_batches(1, 24, 16, seed=3)[0]
    recon_scaled, feats_scaled = (t.detach() for t in sae(x * scale))
    sae.fold_input_scale(scale)
    recon, feats = (t.detach() for t in sae(x))
    torch.testing.assert_close(recon, recon_scaled / scale, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats, feats_scaled / scale, rtol=1e-5, atol=1e-6)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)


def test_input_unit_norm_encode_decode_consistent():
    sae = TopKSAE(user_cfg(architecture="topk", input_unit_norm=True))
    x = 5 + 3 * planted_batches(1, 12, 16, seed=5)[0]
    x_recon, features = sae(x)
    assert torch.equal(sae.encode(x), features)
    torch.testing.assert_close(sae.decode(features, x=x), x_recon)
    torch.testing.assert_close(sae.decode_sparse(sae.encode_sparse(x), x=x), x_recon)
    torch.testing.assert_close(sae.reconstruct(x), x_recon)
    mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
    xn = (x - mean) / (std + 1e-5)
    pre = F.relu((xn - sae.b_dec) @ sae.W_enc)
    top = pre.topk(4, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    torch.testing.assert_close(features, dense)
    torch.testing.assert_close(x_recon, (dense @ sae.W_dec + sae.b_dec) * std + mean)
    with pytest.raises(ValueError, match="pass x="):
        sae.decode(features)


# ------------------------------------------------------------------------------------------------
# Bookkeeping and state
# ------------------------------------------------------------------------------------------------

def test_update_inactive_features_accepts_mask_sparse_and_dense():
    saes = [BatchTopKSAE(user_cfg()) for _ in range(3)]
    x = planted_batches(1, 16, 16)[0]
    acts = saes[0].encode_sparse(x)
    saes[0].update_inactive_features(acts)
    saes[1].update_inactive_features(acts.to_dense())
    saes[2].update_inactive_features(acts.fired())
    for sae in saes[1:]:
        assert torch.equal(sae.num_batches_not_active, saes[0].num_batches_not_active)
        assert torch.equal(sae.ever_fired, saes[0].ever_fired)
    fired = acts.fired()
    assert torch.equal(saes[0].num_batches_not_active, (~fired).long())
    assert saes[0].count_never_fired() == int((~fired).sum())
    saes[0].update_inactive_features(torch.zeros(64, dtype=torch.bool))
    assert saes[0].count_dead_features() == int((~fired).sum())  # n_batches_to_dead=2
    with pytest.raises(ValueError, match="bool mask"):
        saes[0].update_inactive_features(torch.zeros(3, 5))


def test_update_stats_false_leaves_bookkeeping_to_the_caller():
    sae = BatchTopKSAE(user_cfg())
    x = planted_batches(1, 16, 16)[0]
    out = sae(x, return_losses=True, update_stats=False)  # the DDP route into training_forward
    assert set(out) >= {"loss", "mse_loss", "aux_loss", "sparsity_loss", "l0", "x_recon", "acts"}
    assert sae.inference_threshold is None and int(sae.num_batches_not_active.sum()) == 0
    sae.update_inactive_features(out["acts"])
    sae.update_threshold(out["acts"].kept_min)
    assert sae.inference_threshold == pytest.approx(float(out["acts"].values.detach().min()))
    assert torch.equal(sae.num_batches_not_active, (~out["acts"].fired()).long())


def test_state_dict_carries_counters_and_threshold_and_accepts_reference_state_dicts():
    sae = BatchTopKSAE(user_cfg())
    for x in planted_batches(3, 16, 16):
        sae.training_forward(x)
    state = sae.state_dict()
    assert {"num_batches_not_active", "ever_fired", "topk_threshold"} <= set(state)
    other = BatchTopKSAE(user_cfg(seed=99))
    other.load_state_dict(state)
    for key, value in state.items():
        assert torch.equal(other.state_dict()[key], value), key
    ref = BatchTopKSAE(ref_cfg())
    ref_state = {k: v for k, v in PlainReferenceSAE(ref_cfg(seed=5), "batchtopk").state_dict().items()}
    ref.load_state_dict(ref_state)  # strict: the reference code's 4 tensors are enough
    assert torch.equal(ref.W_enc, ref_state["W_enc"])


def test_dense_features_only_when_asked(monkeypatch):
    sae = BatchTopKSAE(user_cfg())
    x = planted_batches(1, 8, 16)[0]
    monkeypatch.setattr(SparseActs, "to_dense", lambda self: pytest.fail("went dense"))
    assert isinstance(sae.encode_sparse(x), SparseActs)
    sae.reconstruct(x)
    sae.get_auxiliary_loss(x, x)
    sae.training_forward(x)["loss"].backward()
    sae.project_decoder_gradients()
    sae.normalize_decoder()


def test_top_level_exports():
    for name in ("SAEConfig", "BatchTopKSAE", "TopKSAE", "VanillaSAE", "JumpReLUSAE", "load_sae", "create_sae"):
        assert hasattr(saefast, name) and name in saefast.__all__
    cfg = SAEConfig.from_dict(user_cfg(architecture="relu", top_k=None).to_dict())
    assert cfg == user_cfg(architecture="relu", top_k=None)
    assert isinstance(create_sae(cfg), VanillaSAE)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    sae = BatchTopKSAE(user_cfg())
    with pytest.raises(ValueError, match=r"expected \[batch, 16\].*d_in=16"):
        sae(torch.randn(4, 17))
    with pytest.raises(ValueError, match="expected"):
        sae.training_forward(torch.randn(16))
    with pytest.raises(TypeError, match=r"dtype torch.float64 .* cast it"):
        sae(torch.randn(4, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="is on meta but the SAE is on cpu"):
        sae.training_forward(torch.empty(4, 16, device="meta"))
    for bad in (float("nan"), float("inf")):
        x = torch.randn(4, 16)
        x[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            sae.training_forward(x)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        sae([1.0] * 16)
    with pytest.raises(ValueError, match="call loss.backward"):
        sae.project_decoder_gradients()
    with pytest.raises(ValueError, match="scale"):
        sae.fold_input_scale(-1.0)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="top_k=65 must be between 1 and d_sae=64"):
        user_cfg(top_k=65)
    with pytest.raises(ValueError, match="top_k_aux=100 must be between 1 and d_sae=64"):
        user_cfg(top_k_aux=100)
    with pytest.raises(ValueError, match="needs top_k"):
        user_cfg(top_k=None)
    with pytest.raises(ValueError, match="architecture='gated' must be one of"):
        user_cfg(architecture="gated")
    with pytest.raises(ValueError, match="dtype='float8' is not a known dtype"):
        user_cfg(dtype="float8")
    with pytest.raises(ValueError, match="d_sae=0 must be a positive int"):
        user_cfg(d_sae=0)
    with pytest.raises(ValueError, match=r"missing required keys \['d_sae'\]"):
        SAEConfig.from_dict({"d_in": 4})
    with pytest.raises(ValueError, match=r"unknown SAEConfig keys \['dict_size'\]"):
        SAEConfig.from_dict({"d_in": 4, "d_sae": 8, "dict_size": 8})
    with pytest.raises(ValueError, match="needs cfg.architecture='batchtopk'"):
        BatchTopKSAE(user_cfg(architecture="topk"))
    bad = ref_cfg()
    del bad["top_k"], bad["seed"]
    with pytest.raises(ValueError, match=r"missing keys \['seed', 'top_k'\]"):
        BatchTopKSAE(bad)
    with pytest.raises(ValueError, match="top_k=100 must be between 1 and d_sae=64"):
        BatchTopKSAE(ref_cfg(top_k=100))
    with pytest.raises(TypeError, match="JumpReLUSAE takes an SAEConfig"):
        JumpReLUSAE(ref_cfg())
    with pytest.raises(TypeError, match="SAEConfig or the reference code's dict"):
        BatchTopKSAE("d_in=16")
    assert math.isclose(user_cfg(top_k=9).top_k_aux, 4)


def test_empty_batches_raise_instead_of_a_nan_loss():
    sae = BatchTopKSAE(user_cfg())
    with pytest.raises(ValueError, match="x has no rows: training_forward"):
        sae.training_forward(torch.empty(0, 16))
    with pytest.raises(ValueError, match="x has no rows"):
        sae.training_forward(torch.empty(3, 0, 16))
    with pytest.raises(ValueError, match="x has no rows: forward"):
        BatchTopKSAE(ref_cfg())(torch.empty(0, 16))
    # encoding nothing is still fine outside the losses
    assert sae.encode(torch.empty(0, 16)).shape == (0, 64)


@pytest.mark.parametrize("typo,meant", [("top_kk", "top_k"), ("input_unit_nrom", "input_unit_norm"),
                                        ("aux_penallty", "aux_penalty")])
def test_reference_dict_typos_name_the_closest_key(typo, meant):
    cfg = ref_cfg()
    cfg[typo] = cfg.pop(meant, True)
    with pytest.raises(ValueError, match=rf"unknown key '{typo}'; did you mean '{meant}'"):
        BatchTopKSAE(cfg)


def test_reference_dict_keeps_its_training_keys_and_warns_on_foreign_ones(caplog):
    cfg = ref_cfg(lr=3e-4, num_tokens=10 ** 9, wandb_project="p", model_batch_size=512, my_note="x")
    with caplog.at_level("WARNING"):
        BatchTopKSAE(cfg)
    assert "'my_note' is not an SAE option" in caplog.text and "'lr'" not in caplog.text


def _bf16_ulp(t):
    """The spacing of bf16 numbers at |t| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(t.abs().clamp_min(1e-30))) - 7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_16bit_jumprelu_differs_from_saelens_maths_only_near_the_threshold(monkeypatch, backend):
    """docs/sae.md: SAELens rounds (x - b_dec) @ W_enc to bf16 before adding b_enc and compares with
    the bf16 threshold of the saved folder; saefast rounds once and compares with the fp32 one. In
    float32 both select the same entries; in bf16 a small fraction differs, all within a few bf16
    steps of the threshold, and shared entries differ by at most two bf16 steps."""
    monkeypatch.setenv("SAEFAST_BACKEND", backend)
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(11)
        sae = JumpReLUSAE(SAEConfig(d_in=96, d_sae=384, architecture="jumprelu", dtype=str(dtype)[6:],
                                    device="cpu", seed=0)).eval()
        with torch.no_grad():
            sae.b_enc.copy_(0.1 * torch.randn(384, generator=g))
            sae.b_dec.copy_(0.1 * torch.randn(96, generator=g))
            sae.threshold.copy_(0.3 + 0.2 * torch.rand(384, generator=g))
            x = torch.randn(300, 96, generator=g).to(dtype)
            ours = sae.encode(x)
            sae_in = x - sae.b_dec
            hidden_pre = sae_in @ sae.W_enc + sae.b_enc  # SAELens' order, in the weights' dtype
            theirs = F.relu(hidden_pre) * (hidden_pre > sae.threshold.to(dtype))
            exact_pre = sae_in.double() @ sae.W_enc.double() + sae.b_enc.double()
        differ = (ours != 0) != (theirs != 0)
        if dtype == torch.float32:
            assert not differ.any()
            torch.testing.assert_close(ours, theirs)
            continue
        threshold = sae.threshold.detach().double().expand_as(exact_pre)
        steps = (exact_pre - threshold).abs() / _bf16_ulp(threshold)
        assert 0 < differ.float().mean() < 0.003, f"{differ.float().mean():.4%} of entries differ"
        assert steps[differ].max() <= 3, "an entry away from its threshold was selected differently"
        both = (ours != 0) & (theirs != 0)
        gap = (ours.float() - theirs.float()).abs()[both]
        # each side is within one step of the exact value (two roundings, or the interpreter's
        # conversion to bf16), so shared entries are at most two steps apart
        assert bool((gap <= 2 * _bf16_ulp(torch.maximum(ours.float().abs(), theirs.float().abs()))[both]).all())


def test_jumprelu_threshold_rule_is_the_same_in_training_and_eval():
    """bf16 pre-activations equal to a threshold's bf16 rounding: the eval encode and the training
    path's selection agree (both compare widened values with the float32 threshold)."""
    cfg = SAEConfig(d_in=1, d_sae=6, architecture="jumprelu", dtype="bfloat16", device="cpu",
                    apply_b_dec_to_input=False, jumprelu_bandwidth=1e-3)
    sae = JumpReLUSAE(cfg)
    values = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.5])
    with torch.no_grad():
        sae.W_enc.copy_(values[None].to(torch.bfloat16))
        sae.b_enc.zero_()
        lo, hi = torch.nextafter(values, torch.tensor(0.0)), torch.nextafter(values, torch.tensor(2.0))
        sae.threshold.copy_(torch.stack([lo, values, hi])[torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6)])
    x = torch.ones(2, 1, dtype=torch.bfloat16)
    sae.eval()
    eval_kept = sorted(set(sae.encode_sparse(x).indices.tolist()))
    sae.train()
    train_kept = sorted(set(sae.training_forward(x, update_stats=False)["acts"].indices.tolist()))
    assert eval_kept == train_kept == [0, 3]
