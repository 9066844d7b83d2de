"""Matryoshka BatchTopK: the training step against dense float64 PyTorch of the same maths on both
backends (nested prefix losses, aux-K, gradients), the sparse path, inference, the configuration,
saving and loading (native, SAELens training checkpoints), and `saefast train` on the synthetic
default."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import saefast
from saefast import MatryoshkaBatchTopKSAE, SAEConfig, SparseActs, create_sae, load_sae
from saefast.evals.metrics import reconstruction_metrics
from saefast.sae.matryoshka import default_prefixes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def make_sae(d_in, d_sae, k, prefixes, dtype=torch.float32, seed=0, **extra):
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, top_k=k, architecture="matryoshka_batchtopk",
                    matryoshka_prefixes=list(prefixes), device=DEVICE, dtype=dtype, seed=seed, **extra)
    sae = create_sae(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=gen))
        if sae.b_enc.requires_grad:
            sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=gen))
    return sae


def _rounded(t, dtype):
    """t rounded to dtype (as the kernels' outputs are), with t's gradient."""
    return t + (t.to(dtype).double() - t).detach()


def _first(scores, n):
    """Indices of the n largest scores, ties to the lower index (the ops' rule)."""
    return torch.sort(scores, descending=True, stable=True).indices[:n]


def dense_step(sae, x, dead):
    """float64 dense Matryoshka BatchTopK: the B*k largest entries of relu(pre), every prefix's
    reconstruction, the mean of their MSEs, aux-K on the detached residual of the whole dictionary.
    Activations are rounded to the SAE's dtype like the ops' outputs. Returns the loss terms, the
    reconstruction and the gradients of every trained parameter."""
    c, dtype = sae.config, sae.dtype
    p = {n: t.detach().cpu().double().requires_grad_(t.requires_grad) for n, t in sae.named_parameters()}
    xd = x.double()
    pre = _rounded(torch.relu((xd - p["b_dec"]) @ p["W_enc"] + p["b_enc"]), dtype)
    flat = pre.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[_first(flat.detach(), min(x.shape[0] * c.top_k, int((flat > 0).sum())))] = True
    acts = (flat * keep).reshape(pre.shape)
    nested = [acts[:, :q] @ p["W_dec"][:q] + p["b_dec"] for q in c.prefix_sizes]
    prefix_mse = torch.stack([(r - xd).pow(2).mean() for r in nested])
    x_hat = nested[-1]
    aux = torch.zeros((), dtype=torch.float64)
    if bool(dead.any()):
        kk = min(c.top_k_aux, int(dead.sum()))
        mask = torch.zeros_like(pre, dtype=torch.bool)
        for r in range(pre.shape[0]):
            scores = torch.where(dead, pre[r].detach(), torch.zeros_like(pre[r]))
            top = _first(scores, kk)
            mask[r, top[scores[top] > 0]] = True
        aux_recon = (pre * mask) @ p["W_dec"]
        aux = c.aux_penalty * (aux_recon - (xd - x_hat).detach()).pow(2).mean()
    loss = prefix_mse.mean() + aux
    loss.backward()
    return {"loss": loss, "prefix_mse": prefix_mse, "aux_loss": aux, "x_hat": x_hat,
            "l0": keep.sum().double() / x.shape[0], "grads": {n: t.grad for n, t in p.items() if t.requires_grad}}


CASES = [
    # B, d_in, d_sae, k, prefixes, n_dead
    (1, 7, 33, 1, (5, 33), 0),            # one row, one active latent
    (37, 12, 40, 3, (4, 10, 25, 40), 9),  # non-powers of two, aux-K on
    (20, 9, 16, 16, (1, 2, 16), 4),       # k = d_sae: every positive entry kept; a one-latent prefix
    (70, 33, 129, 5, (129,), 20),         # a single prefix: plain BatchTopK
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,B,d_in,d_sae,k,prefixes,n_dead",
                         [(torch.float32, *case) for case in CASES] + [(torch.bfloat16, *case) for case in CASES[1:3]])
def test_training_step_matches_dense_oracle(monkeypatch, backend, dtype, B, d_in, d_sae, k, prefixes, n_dead):
    monkeypatch.setenv("SAEFAST_BACKEND", backend)
    monkeypatch.setattr(SparseActs, "to_dense", lambda self: pytest.fail("the training step went dense"))
    sae = make_sae(d_in, d_sae, k, prefixes, dtype=dtype, n_batches_to_dead=3, top_k_aux=4, aux_penalty=0.5,
                   train_b_enc=True)
    gen = torch.Generator().manual_seed(B + d_sae)
    dead_idx = torch.randperm(d_sae, generator=gen)[:n_dead]
    sae.num_batches_not_active[dead_idx.to(DEVICE)] = 5
    x = torch.randn(B, d_in, generator=gen).to(dtype)
    dead = sae.dead_mask().cpu()
    out = sae.training_forward(x.to(DEVICE), update_stats=False)
    out["loss"].backward()
    ref = dense_step(sae, x, dead)
    tol = TOL[dtype]
    for name in ("loss", "prefix_mse", "aux_loss", "l0"):
        torch.testing.assert_close(out[name].detach().double().cpu(), ref[name].detach(), **tol, msg=name)
    torch.testing.assert_close(out["recon_loss"].detach().double().cpu(), ref["prefix_mse"].mean().detach(), **tol)
    torch.testing.assert_close(out["mse_loss"].detach().double().cpu(), ref["prefix_mse"][-1].detach(), **tol)
    torch.testing.assert_close(out["x_recon"].detach().double().cpu(), ref["x_hat"].detach(), **tol)
    if n_dead:
        assert float(out["aux_loss"].detach()) > 0
    for name, grad in ref["grads"].items():
        param = dict(sae.named_parameters())[name]
        torch.testing.assert_close(param.grad.double().cpu(), grad, **tol, msg=f"grad {name}")
    assert len(prefixes) == 1 or not torch.allclose(out["prefix_mse"][0], out["prefix_mse"][-1])


def test_same_numbers_as_batchtopk_when_one_prefix():
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    common = dict(d_in=12, d_sae=30, top_k=3, n_batches_to_dead=1, device=DEVICE, seed=4)
    plain = create_sae(SAEConfig(architecture="batchtopk", **common))
    nested = create_sae(SAEConfig(architecture="matryoshka_batchtopk", matryoshka_groups=1, **common))
    for n_dead in (0, 7):  # without and with dead latents (the fused aux-K path)
        for sae in (plain, nested):
            sae.num_batches_not_active.zero_()[:n_dead] = 3
        a, b = plain.training_forward(x, update_stats=False), nested.training_forward(x, update_stats=False)
        torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b["aux_loss"], a["aux_loss"], rtol=1e-6, atol=1e-7)
        assert (float(b["aux_loss"].detach()) > 0) == (n_dead > 0)
        a["loss"].backward()
        b["loss"].backward()
        for name in ("W_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(nested, name).grad, getattr(plain, name).grad, rtol=1e-5, atol=1e-7)
            getattr(nested, name).grad = getattr(plain, name).grad = None


def test_inference_decode_prefixes_and_prefix_metrics():
    sae = make_sae(10, 24, 3, (3, 8, 24), seed=5)
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    sae.training_forward(x)  # learns the global threshold
    sae.eval()
    acts = sae.encode_sparse(x)
    assert torch.equal(acts.values, acts.values[acts.values > sae.inference_threshold])
    nested = sae.decode_prefixes(acts).detach()
    dense = acts.to_dense().double()
    W, b = sae.W_dec.detach().double(), sae.b_dec.detach().double()
    for g, q in enumerate(sae.config.prefix_sizes):
        torch.testing.assert_close(nested[g].double(), dense[:, :q] @ W[:q] + b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nested[-1], sae.decode_sparse(acts))
    metrics = reconstruction_metrics(sae, [x[:30], x[30:]])
    total = (x.double() - x.double().mean(0)).pow(2).sum()
    for g, q in enumerate(sae.config.prefix_sizes):
        expected = 1 - (nested[g].double() - x.double()).pow(2).sum() / total
        assert metrics[f"explained_variance_prefix_{q}"] == pytest.approx(float(expected), rel=1e-6)
    assert metrics["explained_variance_prefix_24"] == pytest.approx(metrics["explained_variance"])


def test_input_unit_norm_prefixes_undo_the_standardisation():
    sae = make_sae(10, 20, 2, (5, 20), seed=7, input_unit_norm=True)
    x = 3 + 2 * torch.randn(16, 10, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    out = sae.training_forward(x)
    acts = sae.encode_sparse(x)  # training mode: the same BatchTopK codes
    nested = sae.decode_prefixes(acts, x)
    torch.testing.assert_close(nested[-1], out["x_recon"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pass x="):
        sae.decode_prefixes(acts)


def test_prefix_configuration():
    assert default_prefixes(256) == (32, 64, 128, 256)
    assert default_prefixes(100, 3) == (25, 50, 100)
    assert default_prefixes(5) == (1, 2, 5) and default_prefixes(1) == (1,)
    base = dict(d_in=4, d_sae=64, top_k=2, architecture="matryoshka")
    assert SAEConfig(**base).prefix_sizes == (8, 16, 32, 64)
    assert SAEConfig(**base, matryoshka_groups=2).prefix_sizes == (32, 64)
    cfg = SAEConfig(**base, matryoshka_prefixes=[3, 17, 64])
    assert cfg.prefix_sizes == (3, 17, 64) and SAEConfig.from_dict(cfg.to_dict()) == cfg
    assert "prefixes=[3, 17, 64]" in repr(create_sae(SAEConfig(**{**base, "device": "cpu"}, matryoshka_prefixes=[3, 17, 64])))
    bad = [
        (dict(matryoshka_prefixes=[16, 8, 64]), ValueError, "strictly increasing"),
        (dict(matryoshka_prefixes=[0, 64]), ValueError, "positive and strictly increasing"),
        (dict(matryoshka_prefixes=[8, 32]), ValueError, "must end with d_sae=64 .*append 64"),
        (dict(matryoshka_prefixes=[8, 64], matryoshka_groups=2), ValueError, "not both"),
        (dict(matryoshka_groups=8), ValueError, "matryoshka_groups=8 halves d_sae=64 7 times.*at most 7 groups"),
        (dict(matryoshka_groups=0), ValueError, "matryoshka_groups=0 must be >= 1"),
        (dict(matryoshka_prefixes=[8.0, 64]), TypeError, "must be a list of ints"),
        (dict(matryoshka_prefixes="8 64"), TypeError, "must be a list of ints"),
    ]
    for extra, err, match in bad:
        with pytest.raises(err, match=match):
            SAEConfig(**base, **extra)
    with pytest.raises(ValueError, match="needs top_k"):
        SAEConfig(d_in=4, d_sae=64, architecture="matryoshka")
    with pytest.raises(TypeError, match="takes an SAEConfig"):
        MatryoshkaBatchTopKSAE(dict(act_size=4, dict_size=8, top_k=2, top_k_aux=2, aux_penalty=0.1, seed=0,
                                    n_batches_to_dead=5, l1_coeff=0, dtype=torch.float32, device="cpu"))
    assert "MatryoshkaBatchTopKSAE" in saefast.__all__


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------

def trained(seed=0, steps=3):
    sae = make_sae(12, 40, 4, (5, 20, 40), seed=seed, n_batches_to_dead=1).cpu()
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        out = sae.training_forward(torch.randn(32, 12, generator=gen))
        opt.zero_grad()
        out["loss"].backward()
        sae.project_decoder_gradients()
        opt.step()
        sae.normalize_decoder()
    return sae.eval()


def test_native_round_trip_and_the_saelens_view(tmp_path):
    sae = trained()
    folder = sae.save(tmp_path / "m")
    back = load_sae(folder)
    assert type(back) is MatryoshkaBatchTopKSAE and back.config == sae.config
    for key, value in sae.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"  # what SAELens runs it as
    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert torch.equal(weights["threshold"], torch.full((40,), float(sae.topk_threshold)))
    x = torch.randn(20, 12, generator=torch.Generator().manual_seed(9))
    pre = torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    jumprelu = pre * (pre > weights["threshold"])
    torch.testing.assert_close(sae.encode(x), jumprelu)
    torch.testing.assert_close(back.eval().reconstruct(x), jumprelu @ weights["W_dec"] + weights["b_dec"])


def saelens_checkpoint(path, arch, rescale, k=4.0, threshold=0.3, seed=0):
    """A SAELens training checkpoint: its training cfg (float k, matryoshka_widths without d_sae),
    trained b_enc, decoder rows of any norm and the float64 scalar topk_threshold."""
    gen = torch.Generator().manual_seed(seed)
    weights = {"W_enc": 0.5 * torch.randn(12, 40, generator=gen), "b_enc": 0.1 * torch.randn(40, generator=gen),
               "W_dec": torch.randn(40, 12, generator=gen) * (0.05 + torch.rand(40, 1, generator=gen)),
               "b_dec": 0.1 * torch.randn(12, generator=gen),
               "topk_threshold": torch.tensor(threshold, dtype=torch.float64)}
    cfg = {"architecture": arch, "d_in": 12, "d_sae": 40, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "k": k, "topk_threshold_lr": 0.02, "aux_loss_coefficient": 1.0, "rescale_acts_by_decoder_norm": rescale,
           "decoder_init_norm": 0.1, "metadata": {"sae_lens_version": "6.18.0", "hook_name": "blocks.2.hook_resid_post",
                                                   "model_name": "gpt2", "context_size": 64}}
    if arch == "matryoshka_batchtopk":
        cfg.update(matryoshka_widths=[5, 20], use_matryoshka_aux_loss=False)
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(path / "sae_weights.safetensors"))
    return cfg, weights


def saelens_inference(weights, rescale, x):
    """SAELens's encode/decode of a (Matryoshka) BatchTopK SAE at inference: the global threshold
    on the pre-activations, rescaled by the decoder norms when asked."""
    hidden = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    norms = weights["W_dec"].norm(dim=1)
    if rescale:
        hidden = hidden * norms
    acts = hidden.relu() * (hidden > float(weights["topk_threshold"]))
    out = (acts / norms if rescale else acts) @ weights["W_dec"] + weights["b_dec"]
    return acts, out


@pytest.mark.parametrize("arch", ["matryoshka_batchtopk", "batchtopk"])
@pytest.mark.parametrize("rescale", [True, False])
def test_saelens_training_checkpoints_load(tmp_path, arch, rescale):
    cfg, weights = saelens_checkpoint(tmp_path / "ckpt", arch, rescale)
    sae = load_sae(tmp_path / "ckpt").eval()
    assert sae.architecture == arch and sae.config.top_k == 4 and sae.config.topk_threshold_lr == 0.02
    assert sae.config.hook_spec == "blocks.2.hook_resid_post" and sae.b_enc.requires_grad
    assert float(sae.topk_threshold) == pytest.approx(0.3)
    if arch == "matryoshka_batchtopk":
        assert sae.config.prefix_sizes == (5, 20, 40)
    if rescale:  # folded into unit decoder rows
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))
    x = torch.randn(30, 12, generator=torch.Generator().manual_seed(1))
    acts, out = saelens_inference(weights, rescale, x)
    assert (acts > 0).sum() > 10
    torch.testing.assert_close(sae.encode(x), acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.reconstruct(x), out, rtol=1e-5, atol=1e-5)


def test_saelens_topk_with_decoder_norm_rescaling_loads_folded(tmp_path):
    """rescale_acts_by_decoder_norm is folded for every architecture, TopK's inference folder too."""
    cfg, weights = saelens_checkpoint(tmp_path / "topk", "batchtopk", True)
    del weights["topk_threshold"]
    cfg.update(architecture="topk", k=5)
    (tmp_path / "topk" / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(tmp_path / "topk" / "sae_weights.safetensors"))
    sae = load_sae(tmp_path / "topk")
    x = torch.randn(30, 12, generator=torch.Generator().manual_seed(2))
    norms = weights["W_dec"].norm(dim=1)
    hidden = ((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]) * norms
    top = hidden.topk(5, dim=-1)
    acts = torch.zeros_like(hidden).scatter(-1, top.indices, top.values.relu())
    torch.testing.assert_close(sae.encode(x), acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.reconstruct(x), (acts / norms) @ weights["W_dec"] + weights["b_dec"],
                               rtol=1e-5, atol=1e-5)


def test_bad_saelens_checkpoints_raise_clear_errors(tmp_path):
    saelens_checkpoint(tmp_path / "k", "matryoshka_batchtopk", True, k=2.5)
    with pytest.raises(ValueError, match=r"needs k, a whole number .*k=2.5"):
        load_sae(tmp_path / "k")
    cfg, weights = saelens_checkpoint(tmp_path / "w", "matryoshka_batchtopk", False)
    del cfg["matryoshka_widths"]
    (tmp_path / "w" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="needs matryoshka_widths"):
        load_sae(tmp_path / "w")
    cfg, weights = saelens_checkpoint(tmp_path / "t", "batchtopk", False)
    weights["topk_threshold"] = torch.tensor([0.1, 0.2])
    save_file(weights, str(tmp_path / "t" / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"topk_threshold has shape \(2,\); expected a scalar"):
        load_sae(tmp_path / "t")


def test_saelens_loads_saved_matryoshka_as_jumprelu(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = trained()
    theirs = sae_lens.SAE.load_from_disk(str(sae.save(tmp_path / "m")))
    assert type(theirs).__name__ == "JumpReLUSAE"
    x = torch.randn(16, 12)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x))
        torch.testing.assert_close(theirs(x), sae.reconstruct(x))


def test_saelens_matryoshka_checkpoints_round_trip(tmp_path):
    """SAELens's own Matryoshka SAE, trained a few steps: its training checkpoint and its inference
    folder load in saefast with SAELens's outputs, and saefast's save loads back in SAELens."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.sae import TrainStepInput
    torch.manual_seed(0)
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(d_in=12, d_sae=40, k=4, matryoshka_widths=[5, 20, 40],
                                               topk_threshold_lr=0.2, device="cpu")
    theirs = MatryoshkaBatchTopKTrainingSAE(cfg)
    opt = torch.optim.Adam(theirs.parameters(), lr=1e-2)
    for _ in range(5):
        out = theirs.training_forward_pass(TrainStepInput(sae_in=torch.randn(64, 12), coefficients={},
                                                          dead_neuron_mask=None, n_training_steps=0,
                                                          is_logging_step=False))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert float(theirs.topk_threshold) > 0
    theirs.save_model(str(tmp_path / "ckpt"))
    theirs.save_inference_model(str(tmp_path / "inference"))
    inference = sae_lens.SAE.load_from_disk(str(tmp_path / "inference")).eval()
    x = torch.randn(32, 12)
    with torch.no_grad():
        want_acts, want_out = inference.encode(x), inference(x)
    assert (want_acts > 0).sum() > 10
    for folder in ("ckpt", "inference"):
        ours = load_sae(tmp_path / folder).eval()
        assert type(ours).__name__ == ("MatryoshkaBatchTopKSAE" if folder == "ckpt" else "JumpReLUSAE")
        torch.testing.assert_close(ours.encode(x), want_acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.reconstruct(x), want_out, rtol=1e-5, atol=1e-5)
    ours = load_sae(tmp_path / "ckpt")
    assert ours.config.prefix_sizes == (5, 20, 40) and ours.config.top_k == 4
    again = sae_lens.SAE.load_from_disk(str(ours.save(tmp_path / "ours"))).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.encode(x), want_acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again(x), want_out, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# saefast train on the synthetic default
# ------------------------------------------------------------------------------------------------

def test_cli_trains_matryoshka_on_the_synthetic_default(tmp_path, capsys):
    from saefast.cli import main
    from saefast.data.synthetic import SyntheticActivations
    from saefast.evals.metrics import feature_recovery
    rc = main(["train", "--architecture", "matryoshka_batchtopk", "--matryoshka-prefixes", "16", "64", "256",
               "--train-steps", "300", "--batch-size", "512", "--out-dir", str(tmp_path), "--run-name", "m",
               "--no-progress-bar", "--no-tensorboard", "--checkpoint-every", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.index("explained_variance_prefix_16") < out.index("explained_variance_prefix_64") \
        < out.index("explained_variance_prefix_256")
    metrics = json.loads((tmp_path / "m" / "eval.json").read_text())
    sae = load_sae(tmp_path / "m" / "sae")
    assert type(sae) is MatryoshkaBatchTopKSAE and sae.config.prefix_sizes == (16, 64, 256)
    planted = SyntheticActivations(64, 128, 8).true_features
    random_rows = torch.nn.functional.normalize(torch.randn(256, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    assert metrics["feature_recovery"] > feature_recovery(random_rows, planted) + 0.3
    evs = [metrics[f"explained_variance_prefix_{q}"] for q in (16, 64, 256)]
    assert 0.1 < evs[0] < evs[1] < evs[2] == pytest.approx(metrics["explained_variance"])
    assert evs[2] > 0.6 and 3.0 < metrics["l0"] < 5.0
    rows = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train[-1]["mse_loss"] < 0.5 * train[0]["mse_loss"]
    assert all(r["loss"] > r["mse_loss"] for r in train)  # the smaller prefixes reconstruct worse
    assert main(["analyze", str(tmp_path / "m"), "--n-tokens", "2048", "--features", "3"]) == 0
    summary = json.loads((tmp_path / "m" / "analysis" / "summary.json").read_text())
    assert summary["architecture"] == "matryoshka_batchtopk"
    assert summary["reconstruction"]["explained_variance_prefix_16"] < summary["reconstruction"]["explained_variance"]
