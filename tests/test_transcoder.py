"""Transcoders and skip transcoders: every selection (BatchTopK, TopK, ReLU, JumpReLU) with a target
that differs from the input, against a dense PyTorch oracle of the same maths on both backends;
sparse end to end; the SAELens transcoder layout (saved, read back, and foreign folders written
here with SAELens's semantics); folding; bad input.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from saefast import SAEConfig, SparseActs, create_sae, load_sae
from saefast.data.synthetic import SyntheticActivations
from saefast.evals.metrics import feature_recovery

from jumprelu_oracle import DenseJumpReLU, DenseStep

TOL = dict(rtol=2e-4, atol=2e-5)
BACKENDS = ["torch", "triton"]
ARCHS = ["batchtopk", "topk", "relu", "jumprelu"]
EPS = 0.2  # JumpReLU bandwidth


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SAEFAST_BACKEND", request.param)
    return request.param


def make_transcoder(arch, d_in, d_out, d_sae, k, skip, seed=0, **extra):
    if arch == "jumprelu":
        extra.setdefault("jumprelu_bandwidth", EPS)
    cfg = SAEConfig(d_in=d_in, d_out=d_out, d_sae=d_sae, architecture=arch, top_k=k, skip_connection=skip,
                    device="cpu", seed=seed, l1_coefficient=0.01, aux_penalty=0.5, **extra)
    sae = create_sae(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # away from the zero initialisation, so every term has a gradient
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_out, generator=g))
        if skip:
            sae.W_skip.copy_(0.2 * torch.randn(d_in, d_out, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(0.15 + 0.2 * torch.rand(d_sae, generator=g))
    return sae


def data(B, d_in, d_out, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d_in, generator=g), torch.randn(B, d_out, generator=g)


# ------------------------------------------------------------------------------------------------
# Dense oracle: the transcoder's maths on the dense [B, d_sae] matrix
# ------------------------------------------------------------------------------------------------

def dense_transcoder(p, arch, x, y, k, k_aux, dead, l1=0.01, aux_penalty=0.5):
    """Losses, output and dense features of a transcoder; p: its parameters (leaf tensors)."""
    pre = F.relu(x @ p["W_enc"] + p["b_enc"])  # a transcoder never subtracts b_dec from its input
    B, d_sae = pre.shape
    sparsity = torch.zeros(())
    if arch == "batchtopk":
        keep = torch.zeros(B * d_sae, dtype=torch.bool)
        keep[pre.detach().flatten().topk(B * k).indices] = True
        acts = pre * (keep.reshape(B, d_sae) & (pre > 0))
    elif arch == "topk":
        keep = torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.detach().topk(k, dim=1).indices, True)
        acts = pre * (keep & (pre > 0))
    elif arch == "relu":
        acts = pre
        sparsity = l1 * acts.sum(-1).mean()
    else:
        acts = DenseJumpReLU.apply(pre, p["threshold"], EPS)
        sparsity = l1 * DenseStep.apply(pre, p["threshold"], EPS).sum(-1).mean()
    out = acts @ p["W_dec"] + p["b_dec"]
    if "W_skip" in p:
        out = out + x @ p["W_skip"]
    mse = (out - y).pow(2).mean()
    aux = torch.zeros(())
    if arch in ("batchtopk", "topk") and dead.any():
        cols = dead.nonzero().flatten()
        sub = pre[:, cols]
        top = sub.detach().topk(min(k_aux, cols.numel()), dim=1)
        aux_acts = torch.zeros_like(sub).scatter(1, top.indices, 1.0) * (sub > 0) * sub
        aux_recon = aux_acts @ p["W_dec"][cols]
        aux = aux_penalty * (aux_recon - (y - out).detach()).pow(2).mean()
    return {"loss": mse + sparsity + aux, "mse_loss": mse, "sparsity_loss": sparsity, "aux_loss": aux,
            "x_recon": out, "features": acts}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("B,d_in,d_out,d_sae,k", [(1, 7, 5, 33, 3), (37, 12, 20, 64, 5), (19, 16, 9, 24, 24)])
def test_transcoder_matches_dense_oracle_forward_and_backward(backend, arch, skip, B, d_in, d_out, d_sae, k):
    sae = make_transcoder(arch, d_in, d_out, d_sae, k, skip, n_batches_to_dead=0)  # every latent dead: aux-K on
    x, y = data(B, d_in, d_out)
    dead = sae.dead_mask().clone()
    out = sae.training_forward(x, target=y, update_stats=False)
    out["loss"].backward()

    p = {n: t.detach().clone().requires_grad_() for n, t in sae.named_parameters()}
    want = dense_transcoder(p, arch, x, y, k, sae.config.top_k_aux, dead)
    want["loss"].backward()
    for key in ("loss", "mse_loss", "sparsity_loss", "aux_loss", "x_recon"):
        torch.testing.assert_close(out[key].float(), want[key].float(), **TOL, msg=f"{arch} {key}")
    if arch in ("batchtopk", "topk"):
        assert float(want["aux_loss"].detach()) > 0, "the aux-K loss must be exercised"
    torch.testing.assert_close(out["acts"].to_dense(), want["features"], **TOL)
    assert out["x_recon"].shape == (B, d_out)
    for name, param in sae.named_parameters():
        if not param.requires_grad:
            continue
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, p[name].grad, **TOL, msg=f"{arch} grad {name}")


@pytest.mark.parametrize("arch", ARCHS)
def test_classic_api_of_a_skip_transcoder_matches_dense(arch):
    sae = make_transcoder(arch, 10, 6, 40, 4, True).eval()
    if arch == "batchtopk":
        sae.update_threshold(torch.tensor(0.3))
    x, _ = data(3 * 5, 10, 6)
    x = x.reshape(3, 5, 10)
    w = {n: t.detach() for n, t in sae.named_parameters()}
    pre = F.relu(x @ w["W_enc"] + w["b_enc"])
    if arch == "batchtopk":
        feats = pre * (pre > 0.3)
    elif arch == "topk":
        feats = torch.zeros_like(pre).scatter(-1, pre.topk(4, dim=-1).indices, pre.topk(4, dim=-1).values)
    elif arch == "jumprelu":
        feats = pre * (pre > w["threshold"])
    else:
        feats = pre
    out = feats @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"]
    recon, features = sae(x)
    torch.testing.assert_close(features, feats, **TOL)
    torch.testing.assert_close(recon, out, **TOL)
    torch.testing.assert_close(sae.reconstruct(x), out, **TOL)
    torch.testing.assert_close(sae.decode(sae.encode(x), x), out, **TOL)
    torch.testing.assert_close(sae.decode_sparse(sae.encode_sparse(x), x).reshape(3, 5, 6), out, **TOL)
    with pytest.raises(ValueError, match="skip connection.*pass x="):
        sae.decode_sparse(sae.encode_sparse(x))


def test_transcoder_training_stays_sparse(monkeypatch):
    monkeypatch.setattr(SparseActs, "to_dense", lambda self: pytest.fail("the training path went dense"))
    for arch in ARCHS:
        sae = make_transcoder(arch, 12, 8, 48, 4, True, n_batches_to_dead=0)
        x, y = data(16, 12, 8)
        out = sae.training_forward(x, target=y)
        out["loss"].backward()
        sae.project_decoder_gradients()
        sae.normalize_decoder()


def test_transcoder_learns_planted_pairs():
    src = SyntheticActivations(16, 24, 256, mean_active=2.0, d_out=12, seed=1)
    sae = create_sae(SAEConfig(d_in=16, d_out=12, d_sae=48, architecture="topk", top_k=2, device="cpu", seed=0))
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(300):
        batch = next(src)
        out = sae.training_forward(batch.x, target=batch.target)
        losses.append(float(out["mse_loss"].detach()))
        opt.zero_grad()
        out["loss"].backward()
        sae.project_decoder_gradients()
        opt.step()
        sae.normalize_decoder()
    assert feature_recovery(sae.W_dec, src.true_features) > 0.95
    assert sum(losses[-10:]) < 0.2 * sum(losses[:10])


# ------------------------------------------------------------------------------------------------
# Files: the SAELens transcoder layout
# ------------------------------------------------------------------------------------------------

SAVED_NAMES = {("relu", False): "transcoder", ("relu", True): "skip_transcoder",
               ("jumprelu", False): "jumprelu_transcoder", ("batchtopk", False): "jumprelu_transcoder",
               ("jumprelu", True): "jumprelu_skip_transcoder", ("batchtopk", True): "jumprelu_skip_transcoder",
               ("topk", False): "topk_transcoder", ("topk", True): "topk_skip_transcoder"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_transcoder_round_trips_in_the_saelens_transcoder_layout(tmp_path, arch, skip):
    sae = make_transcoder(arch, 10, 7, 30, 3, skip, hook_spec="blocks.2.ln2.hook_normalized",
                          hook_spec_out="blocks.2.hook_mlp_out")
    sae.training_forward(*data(20, 10, 7)[:1], target=data(20, 10, 7)[1])  # counters and threshold move
    folder = sae.save(tmp_path / "tc")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == SAVED_NAMES[(arch, skip)]
    assert (cfg["d_in"], cfg["d_out"], cfg["d_sae"]) == (10, 7, 30)
    assert cfg["apply_b_dec_to_input"] is False
    assert cfg["metadata"]["hook_name"] == "blocks.2.ln2.hook_normalized"
    assert cfg["metadata"]["hook_name_out"] == "blocks.2.hook_mlp_out"
    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert weights["W_dec"].shape == (30, 7) and weights["b_dec"].shape == (7,)
    if skip:
        torch.testing.assert_close(weights["W_skip"], sae.W_skip.detach().t(), rtol=0, atol=0)  # [d_out, d_in]
    else:
        assert "W_skip" not in weights
    back = load_sae(folder)
    assert type(back) is type(sae) and back.config == sae.config
    for key, value in sae.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    x, _ = data(9, 10, 7)
    torch.testing.assert_close(back.eval().reconstruct(x), sae.eval().reconstruct(x), rtol=0, atol=0)


def saelens_transcoder(w, arch, x):
    """SAELens's Transcoder / SkipTranscoder / JumpReLUTranscoder inference maths (W_skip [d_out, d_in])."""
    pre = x @ w["W_enc"] + w["b_enc"]
    acts = pre.relu() * (pre > w["threshold"]) if arch == "jumprelu_transcoder" else pre.relu()
    out = acts @ w["W_dec"] + w["b_dec"]
    if arch == "skip_transcoder":
        out = out + x @ w["W_skip"].T
    return acts, out


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder"])
def test_saelens_transcoder_folders_load_with_their_semantics(tmp_path, arch):
    g = torch.Generator().manual_seed(0)
    d_in, d_out, d_sae = 8, 6, 20
    W_dec = torch.randn(d_sae, d_out, generator=g)
    w = {"W_enc": 0.5 * torch.randn(d_in, d_sae, generator=g), "b_enc": 0.1 * torch.randn(d_sae, generator=g),
         "W_dec": W_dec / W_dec.norm(dim=1, keepdim=True), "b_dec": torch.randn(d_out, generator=g)}
    if arch == "skip_transcoder":
        w["W_skip"] = torch.randn(d_out, d_in, generator=g)
    if arch == "jumprelu_transcoder":
        w["threshold"] = 0.3 * torch.rand(d_sae, generator=g)
    cfg = {"architecture": arch, "d_in": d_in, "d_out": d_out, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.5.0", "model_name": "gemma-2-2b", "hook_name": "blocks.3.ln2.hook_normalized",
                        "hook_name_out": "blocks.3.hook_mlp_out", "hook_head_index": None, "prepend_bos": True}}
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(folder / "sae_weights.safetensors"))
    sae = load_sae(folder)
    assert sae.architecture == ("jumprelu" if arch == "jumprelu_transcoder" else "relu")
    assert sae.config.hook_spec == "blocks.3.ln2.hook_normalized"
    assert sae.config.hook_spec_out == "blocks.3.hook_mlp_out"
    assert sae.config.skip_connection == (arch == "skip_transcoder")
    x = torch.randn(11, d_in, generator=g)
    acts, out = saelens_transcoder(w, arch, x)
    torch.testing.assert_close(sae.encode(x), acts, **TOL)
    torch.testing.assert_close(sae.reconstruct(x), out, **TOL)
    saved = sae.save(tmp_path / "out")
    assert json.loads((saved / "cfg.json").read_text())["architecture"] == arch
    written = load_file(str(saved / "sae_weights.safetensors"))
    assert set(written) == set(w)
    for name, tensor in w.items():
        assert torch.equal(written[name], tensor), name


def test_saelens_transcoder_folder_with_a_misshapen_skip_is_refused(tmp_path):
    sae = make_transcoder("relu", 8, 6, 20, 2, True)
    folder = sae.save(tmp_path / "tc")
    weights = load_file(str(folder / "sae_weights.safetensors"))
    weights["W_skip"] = weights["W_skip"].t().contiguous()  # [d_in, d_out]: not SAELens's layout
    save_file(weights, str(folder / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"W_skip has shape \(8, 6\).*\[d_out, d_in\]"):
        load_sae(folder)


# ------------------------------------------------------------------------------------------------
# Folding and bad input
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_fold_input_and_target_scales(arch):
    sae = make_transcoder(arch, 10, 6, 30, 4, True).eval()
    if arch == "batchtopk":
        sae.update_threshold(torch.tensor(0.4))
    x, _ = data(25, 10, 6)
    s_in, s_out = 0.3, 2.5
    want = sae.reconstruct(x * s_in) / s_out
    sae.fold_input_scale(s_in, target_scale=s_out)
    torch.testing.assert_close(sae.reconstruct(x), want, rtol=1e-4, atol=1e-5)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(30), atol=1e-5)


def test_transcoder_bad_input_names_the_fix():
    sae = make_transcoder("topk", 8, 5, 20, 2, False)
    x, y = data(4, 8, 5)
    with pytest.raises(ValueError, match="pass target="):
        sae.training_forward(x)
    with pytest.raises(ValueError, match=r"target has shape \(4, 8\).*d_out=5"):
        sae.training_forward(x, target=x)
    with pytest.raises(ValueError, match="target has 3 rows but x has 4"):
        sae.training_forward(x, target=y[:3])
    plain = create_sae(SAEConfig(d_in=8, d_sae=20, top_k=2, device="cpu"))
    with pytest.raises(ValueError, match="target= is for transcoders"):
        plain.training_forward(x, target=y)
    with pytest.raises(ValueError, match="skip_connection=True needs a transcoder"):
        SAEConfig(d_in=8, d_sae=20, top_k=2, skip_connection=True)
    with pytest.raises(ValueError, match="input_unit_norm"):
        SAEConfig(d_in=8, d_out=5, d_sae=20, top_k=2, input_unit_norm=True)
    with pytest.raises(ValueError, match="d_out=0 must be a positive int"):
        SAEConfig(d_in=8, d_out=0, d_sae=20, top_k=2)
    with pytest.raises(ValueError, match="only a transcoder"):
        SAEConfig(d_in=8, d_sae=20, top_k=2, hook_spec_out="blocks.0.hook_mlp_out")
    assert SAEConfig(d_in=8, d_out=5, d_sae=20, top_k=2).apply_b_dec_to_input is False


@pytest.mark.parametrize("arch,skip,theirs", [("relu", False, "Transcoder"), ("relu", True, "SkipTranscoder"),
                                              ("jumprelu", False, "JumpReLUTranscoder"),
                                              ("batchtopk", False, "JumpReLUTranscoder")])
def test_saelens_loads_saefast_transcoders(tmp_path, arch, skip, theirs):
    sae_lens = pytest.importorskip("sae_lens")  # SAELens 6 needs transformer-lens < 4
    sae = make_transcoder(arch, 10, 7, 30, 3, skip).eval()
    if arch == "batchtopk":
        sae.update_threshold(torch.tensor(0.3))
    loaded = sae_lens.SAE.load_from_disk(str(sae.save(tmp_path / arch)))
    assert type(loaded).__name__ == theirs
    x, _ = data(9, 10, 7)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), **TOL)
        torch.testing.assert_close(loaded(x), sae.reconstruct(x), **TOL)


def test_matryoshka_transcoder_matches_dense_prefix_oracle(backend):
    """A Matryoshka BatchTopK transcoder: each prefix's output (with b_dec and the skip) against
    the target, the loss their mean MSE plus aux-K, gradients from the dense oracle."""
    prefixes = [6, 20, 48]
    sae = make_transcoder("matryoshka_batchtopk", 12, 9, 48, 4, True, n_batches_to_dead=0,
                          matryoshka_prefixes=prefixes)
    x, y = data(23, 12, 9)
    dead = sae.dead_mask().clone()
    out = sae.training_forward(x, target=y, update_stats=False)
    out["loss"].backward()
    p = {n: t.detach().clone().requires_grad_() for n, t in sae.named_parameters()}
    full = dense_transcoder(p, "batchtopk", x, y, 4, sae.config.top_k_aux, dead)
    acts, skip = full["features"], x @ p["W_skip"]
    prefix_mse = torch.stack([((acts[:, :n] @ p["W_dec"][:n] + p["b_dec"] + skip) - y).pow(2).mean()
                              for n in prefixes])
    (prefix_mse.mean() + full["aux_loss"]).backward()
    torch.testing.assert_close(out["prefix_mse"], prefix_mse.detach(), **TOL)
    torch.testing.assert_close(out["x_recon"], full["x_recon"].detach(), **TOL)
    torch.testing.assert_close(out["loss"], (prefix_mse.mean() + full["aux_loss"]).detach(), **TOL)
    for name, param in sae.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, p[name].grad, **TOL, msg=f"grad {name}")
    nested = sae.eval().decode_prefixes(sae.encode_sparse(x), x)
    assert nested.shape == (3, 23, 9)
    torch.testing.assert_close(nested[-1], sae.reconstruct(x), **TOL)
