"""Saving, loading and converting SAEs: native (SAELens layout) round trips, SAELens v6 and pre-6
folders, sparsify folders, the BatchTopK reference code's state dicts, and bad folders.

Every foreign folder is written by the test itself, and each loaded SAE is checked against a plain
PyTorch implementation of that library's encode/decode semantics.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import saefast
from saefast import BatchTopKSAE, JumpReLUSAE, SAEConfig, TopKSAE, VanillaSAE, create_sae, load_sae
from saefast import io as sio


class Note:
    """A picklable object that is not a tensor (a weights-only load must refuse it)."""

    def __init__(self, text):
        self.text = text




D_IN, D_SAE = 12, 40


def data(n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=gen)


def random_weights(seed=0, dtype=torch.float32, threshold=False):
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(D_SAE, D_IN, generator=gen)
    weights = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=gen) * 0.4,
        "b_enc": torch.randn(D_SAE, generator=gen) * 0.1,
        "W_dec": W_dec / W_dec.norm(dim=1, keepdim=True),
        "b_dec": torch.randn(D_IN, generator=gen) * 0.1,
    }
    if threshold:
        weights["threshold"] = 0.2 + 0.3 * torch.rand(D_SAE, generator=gen)
    return {k: v.to(dtype) for k, v in weights.items()}


def trained(arch, dtype="float32", steps=3, **extra):
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, top_k=4, n_batches_to_dead=1, device="cpu",
                    dtype=dtype, seed=1, l1_coefficient=1e-3, model_name="gpt2", dataset_path="toy",
                    context_size=64, **extra)
    sae = create_sae(cfg)
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        out = sae.training_forward(data(32, seed=step).to(sae.dtype))
        opt.zero_grad()
        out["loss"].backward()
        sae.project_decoder_gradients()
        opt.step()
        sae.normalize_decoder()
    with torch.no_grad():
        sae.b_dec.add_(0.05)
    return sae.eval()


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------------------------------------
# Native save / load
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,dtype,extra", [
    ("batchtopk", "float32", {}),
    ("batchtopk", "bfloat16", {"input_unit_norm": True}),
    ("topk", "float32", {"apply_b_dec_to_input": False}),
    ("relu", "float32", {}),
    ("jumprelu", "float32", {"jumprelu_init_threshold": 0.05}),
    ("jumprelu", "bfloat16", {"jumprelu_init_threshold": 0.05}),
])
def test_native_round_trip_is_bit_exact(tmp_path, arch, dtype, extra):
    sae = trained(arch, dtype, **extra)
    history = {"loss": [3.0, 2.5, torch.tensor(2.0)], "l0": [4.0, 4.0, 4.0]}
    folder = sae.save(tmp_path / "sae", history=history)
    assert sorted(os.listdir(folder)) == ["cfg.json", "history.json", "sae_weights.safetensors",
                                          "saefast_state.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["sae"]  # no temporary folder left behind
    loaded = load_sae(folder)
    assert type(loaded) is type(sae) and loaded.config == sae.config
    assert_same_state(sae, loaded)
    x = (3 + data()).to(sae.dtype)
    loaded.eval()
    assert torch.equal(loaded.reconstruct(x), sae.reconstruct(x))
    again, hist = type(sae).load(folder, load_history=True)
    assert_same_state(sae, again)
    assert hist == {"loss": [3.0, 2.5, 2.0], "l0": [4.0, 4.0, 4.0]}

    cfg = json.loads((folder / "cfg.json").read_text())
    weights = load_file(str(folder / "sae_weights.safetensors"))
    expected_keys = {"W_enc", "b_enc", "W_dec", "b_dec"}
    if arch in ("batchtopk", "jumprelu"):
        expected_keys.add("threshold")
    assert set(weights) == expected_keys
    assert {k: v.dtype for k, v in weights.items()} == {k: sae.dtype for k in expected_keys}
    assert cfg["architecture"] == {"batchtopk": "jumprelu", "jumprelu": "jumprelu", "topk": "topk",
                                   "relu": "standard"}[arch]
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE and cfg["dtype"] == dtype
    assert cfg["metadata"]["sae_lens_version"] == "6.0.0"
    assert cfg["metadata"]["hook_name"] == "blocks.9.hook_resid_post" and cfg["metadata"]["model_name"] == "gpt2"
    assert cfg["normalize_activations"] == ("layer_norm" if extra.get("input_unit_norm") else "none")
    assert cfg["apply_b_dec_to_input"] == extra.get("apply_b_dec_to_input", True)
    if arch == "topk":
        assert cfg["k"] == 4
    if arch == "batchtopk":
        assert sae.inference_threshold is not None
        assert torch.equal(weights["threshold"], torch.full((D_SAE,), sae.inference_threshold).to(sae.dtype))
        assert cfg["saefast"]["topk_threshold"] == float(sae.topk_threshold)
    with pytest.raises(ValueError, match="holds a"):
        (TopKSAE if arch != "topk" else VanillaSAE).load(folder)


def test_saved_batchtopk_runs_as_a_jumprelu_with_its_global_threshold(tmp_path):
    sae = trained("batchtopk")
    folder = sae.save(tmp_path / "b")
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["saefast"]  # what a reader without saefast sees: a SAELens JumpReLU SAE
    (folder / "cfg.json").write_text(json.dumps(cfg))
    as_jumprelu = load_sae(folder)
    assert isinstance(as_jumprelu, JumpReLUSAE)
    x = data()
    torch.testing.assert_close(as_jumprelu.encode(x), sae.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(as_jumprelu.reconstruct(x), sae.reconstruct(x), rtol=0, atol=0)


def test_save_refuses_to_overwrite_and_never_loses_weights(tmp_path, monkeypatch):
    first, second = trained("topk"), trained("topk", steps=5)
    folder = tmp_path / "run"
    first.save(folder, history={"loss": [1.0]})
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        second.save(folder)

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(sio, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        second.save(folder, overwrite=True)
    monkeypatch.undo()
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    assert sorted(os.listdir(tmp_path)) == ["run"]

    second.save(folder, overwrite=True)  # no history this time: the stale history.json goes
    assert sorted(os.listdir(folder)) == ["cfg.json", "sae_weights.safetensors", "saefast_state.safetensors"]
    assert sio.read_history(folder) is None and sio.read_log_sparsity(folder) is None
    log_sparsity = torch.linspace(-6, 0, D_SAE)
    second.save(folder, overwrite=True, log_sparsity=log_sparsity)
    assert torch.equal(sio.read_log_sparsity(folder), log_sparsity)
    with pytest.raises(ValueError, match=r"log_sparsity must be a tensor of shape \[40\]"):
        second.save(folder, overwrite=True, log_sparsity=torch.zeros(3))
    assert_same_state(load_sae(folder), second)
    assert sorted(os.listdir(tmp_path)) == ["run"]
    second.save(folder, overwrite=True)
    assert "sparsity.safetensors" not in os.listdir(folder)

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "metrics.jsonl").write_text("{}\n")
    first.save(shared)  # an existing folder without an SAE: other files stay
    assert sorted(os.listdir(shared)) == ["cfg.json", "metrics.jsonl", "sae_weights.safetensors",
                                          "saefast_state.safetensors"]


# ------------------------------------------------------------------------------------------------
# SAELens folders
# ------------------------------------------------------------------------------------------------

def saelens_encode(w, cfg, x):
    """SAELens semantics (standard / topk / jumprelu inference SAEs)."""
    mu = std = None
    if cfg.get("normalize_activations") == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        x = x - mu
        std = x.std(-1, keepdim=True)
        x = x / (std + 1e-5)
    hidden_pre = (x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)) @ w["W_enc"] + w["b_enc"]
    arch = cfg["architecture"]
    if arch == "topk":
        top = hidden_pre.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())
    elif arch == "jumprelu":
        acts = hidden_pre.relu() * (hidden_pre > w["threshold"])
    else:
        acts = hidden_pre.relu()
    out = acts @ w["W_dec"] + w["b_dec"]
    if mu is not None:
        out = out * std + mu
    return acts, out


def v6_cfg(arch, **extra):
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.12.0", "sae_lens_training_version": "6.12.0", "model_name": "gpt2",
                        "hook_name": "blocks.3.hook_resid_post", "hook_head_index": None, "prepend_bos": True,
                        "context_size": 128, "dataset_path": "monology/pile-uncopyrighted"}}
    if arch == "topk":
        cfg.update(k=5, rescale_acts_by_decoder_norm=False)
    cfg.update(extra)
    return cfg


def pre6_cfg(arch, **extra):
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "device": "cpu", "model_name": "gpt2-small",
           "hook_point": "blocks.5.hook_resid_pre", "hook_point_layer": 5, "hook_point_head_index": None,
           "activation_fn_str": "relu", "apply_b_dec_to_input": True, "normalize_activations": False,
           "finetuning_scaling_factor": False, "context_size": 128, "dataset_path": "Skylion007/openwebtext",
           "sae_lens_training_version": "3.5.0", "prepend_bos": True}
    if arch == "topk":
        cfg.update(activation_fn_str="topk", activation_fn_kwargs={"k": 5})
    elif arch == "jumprelu":
        cfg["architecture"] = "jumprelu"
    cfg.update(extra)
    return cfg


def write_folder(path, cfg, weights, weights_name="sae_weights.safetensors"):
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(path / weights_name))
    return path


@pytest.mark.parametrize("make_cfg", [v6_cfg, pre6_cfg], ids=["v6", "pre6"])
@pytest.mark.parametrize("arch,extra", [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("topk", {}),
    ("jumprelu", {}),
    ("jumprelu", {"normalize_activations": "layer_norm"}),
])
def test_saelens_folders_load_with_their_semantics_and_round_trip(tmp_path, make_cfg, arch, extra):
    cfg = make_cfg(arch, **extra)
    weights = random_weights(threshold=arch == "jumprelu")
    folder = write_folder(tmp_path / "in", cfg, weights)
    sae = load_sae(folder)
    expected_cls = {"standard": VanillaSAE, "topk": TopKSAE, "jumprelu": JumpReLUSAE}[arch]
    assert type(sae) is expected_cls
    hook = cfg["metadata"]["hook_name"] if "metadata" in cfg else cfg["hook_point"]
    assert sae.config.hook_spec == hook and sae.config.hook_layer == int(hook.split(".")[1])
    assert sae.config.model_name == (cfg["metadata"]["model_name"] if "metadata" in cfg else cfg["model_name"])
    if arch == "topk":
        assert sae.config.top_k == 5
    sem_cfg = {"architecture": arch, "k": 5, **extra}
    x = 2 + data()
    acts, out = saelens_encode(weights, sem_cfg, x)
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae.reconstruct(x), out)
    torch.testing.assert_close(sae.forward(x)[0], out)

    saved = sae.save(tmp_path / "out")
    written = load_file(str(saved / "sae_weights.safetensors"))
    assert set(written) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(written[name], tensor), name
    assert_same_state(load_sae(saved), sae)


def test_saelens_log_threshold_and_unit_scaling_factor(tmp_path):
    weights = random_weights(threshold=True)
    weights["log_threshold"] = weights.pop("threshold").log()
    weights["scaling_factor"] = torch.ones(D_SAE)
    sae = load_sae(write_folder(tmp_path / "a", v6_cfg("jumprelu"), weights))
    torch.testing.assert_close(sae.threshold.detach(), weights["log_threshold"].exp())


# ------------------------------------------------------------------------------------------------
# sparsify folders
# ------------------------------------------------------------------------------------------------

def sparsify_forward(w, k, x):
    pre = F.relu(F.linear(x - w["b_dec"], w["encoder.weight"], w["encoder.bias"]))
    top_acts, top_idx = pre.topk(k, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, top_idx, top_acts)
    return dense, dense @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsify_folder_loads_and_round_trips(tmp_path, dtype):
    base = random_weights(dtype=dtype)
    weights = {"encoder.weight": base["W_enc"].t().contiguous(), "encoder.bias": base["b_enc"],
               "W_dec": base["W_dec"], "b_dec": base["b_dec"]}
    cfg = {"activation": "topk", "expansion_factor": D_SAE // D_IN, "normalize_decoder": True, "num_latents": D_SAE,
           "k": 6, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN}
    folder = write_folder(tmp_path / "layers.6", cfg, weights, "sae.safetensors")
    sae = load_sae(folder)
    assert isinstance(sae, TopKSAE) and sae.config.top_k == 6 and sae.dtype == dtype
    assert sae.b_enc.requires_grad and sae.config.hook_spec == "blocks.6.hook_resid_post"
    x = data().to(dtype)
    acts, out = sparsify_forward(weights, 6, x)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(sae.encode(x), acts, **tol)
    torch.testing.assert_close(sae.reconstruct(x), out, **tol)

    saved = sio.save_sparsify(sae, tmp_path / "back")
    written = load_file(str(saved / "sae.safetensors"))
    assert set(written) == set(weights)
    for name, tensor in weights.items():
        assert written[name].dtype == dtype and torch.equal(written[name], tensor), name
    assert json.loads((saved / "cfg.json").read_text()) == cfg
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sio.save_sparsify(sae, saved)
    with pytest.raises(ValueError, match="per-token TopK"):
        sio.save_sparsify(trained("batchtopk"), tmp_path / "nope")


# ------------------------------------------------------------------------------------------------
# The BatchTopK reference code
# ------------------------------------------------------------------------------------------------

def reference_cfg(**overrides):
    cfg = dict(act_size=D_IN, dict_size=D_SAE, top_k=4, top_k_aux=16, aux_penalty=1 / 32, n_batches_to_dead=0,
               input_unit_norm=True, l1_coeff=1e-3, seed=3, dtype=torch.float32, device="cpu", sae_type="batchtopk")
    cfg.update(overrides)
    return cfg


def reference_forward(w, cfg, x):
    """The reference code's BatchTopKSAE forward with n_batches_to_dead=0 (every latent counts as dead)."""
    mean = x.mean(-1, keepdim=True)
    x = x - mean
    std = x.std(-1, keepdim=True)
    x = x / (std + 1e-5)
    acts = F.relu((x - w["b_dec"]) @ w["W_enc"])
    top = acts.flatten().topk(cfg["top_k"] * x.shape[0])
    sparse = torch.zeros_like(acts.flatten()).scatter(-1, top.indices, top.values).reshape(acts.shape)
    x_rec = sparse @ w["W_dec"] + w["b_dec"]
    l2 = (x_rec - x).pow(2).mean()
    dead = torch.ones(acts.shape[1], dtype=torch.bool)  # num_batches_not_active >= 0 everywhere
    aux_top = acts[:, dead].topk(min(cfg["top_k_aux"], int(dead.sum())), dim=-1)
    aux = torch.zeros_like(acts[:, dead]).scatter(-1, aux_top.indices, aux_top.values) @ w["W_dec"][dead]
    aux_loss = cfg["aux_penalty"] * (aux - (x - x_rec)).pow(2).mean()
    loss = l2 + cfg["l1_coeff"] * sparse.abs().sum(-1).mean() + aux_loss
    return {"sae_out": x_rec * std + mean, "l2_loss": l2, "aux_loss": aux_loss, "loss": loss}


def test_reference_state_dict_converts_both_ways(tmp_path):
    cfg = reference_cfg()
    weights = random_weights(seed=4)
    weights["b_enc"] = torch.zeros(D_SAE)
    rng_before = torch.random.get_rng_state()
    sae = sio.from_reference_state_dict(weights, cfg)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # converting does not reseed
    assert isinstance(sae, BatchTopKSAE) and sae.reference_mode and sae.cfg == cfg
    x = 1 + data()
    out, expected = sae(x), reference_forward(weights, cfg, x)
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], msg=key)

    state_dict, cfg_back = sio.to_reference_state_dict(sae)
    assert cfg_back == cfg
    for name, tensor in weights.items():
        assert torch.equal(state_dict[name], tensor), name

    native = trained("topk")
    state_dict, cfg_native = sio.to_reference_state_dict(native)
    assert cfg_native["sae_type"] == "topk" and cfg_native["act_size"] == D_IN
    again = sio.from_reference_state_dict(state_dict, cfg_native)
    assert isinstance(again, TopKSAE)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(again, name), getattr(native, name)), name

    folder = tmp_path / "checkpoints" / "run_1000"
    folder.mkdir(parents=True)
    torch.save(weights, folder / "sae.pt")
    json_cfg = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in cfg.items()}
    (folder / "config.json").write_text(json.dumps(json_cfg))
    from_disk = load_sae(folder)
    assert isinstance(from_disk, BatchTopKSAE) and from_disk.config.torch_dtype() == torch.float32
    for name, tensor in weights.items():
        assert torch.equal(getattr(from_disk, name), tensor), name

    with pytest.raises(ValueError, match="sae_type='jumprelu' is not supported"):
        sio.from_reference_state_dict(weights, reference_cfg(sae_type="jumprelu"))
    with pytest.raises(ValueError, match="no JumpReLUSAE"):
        sio.to_reference_state_dict(trained("jumprelu"))


# ------------------------------------------------------------------------------------------------
# Bad folders and files
# ------------------------------------------------------------------------------------------------

def test_bad_folders_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sae(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="is not a folder"):
        load_sae(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match=r"is not an SAE folder: expected cfg.json \+ sae_weights.safetensors"):
        load_sae(tmp_path)

    weights = random_weights()
    transposed = dict(weights, W_enc=weights["W_enc"].t().contiguous())
    folder = write_folder(tmp_path / "shapes", v6_cfg("standard"), transposed)
    with pytest.raises(ValueError, match=r"W_enc has shape \(40, 12\) but the config says d_in=12, d_sae=40"):
        load_sae(folder)

    cfg = v6_cfg("standard")
    del cfg["d_sae"]
    with pytest.raises(ValueError, match=r"cfg.json is missing \['d_sae'\]"):
        load_sae(write_folder(tmp_path / "nokey", cfg, weights))
    with pytest.raises(ValueError, match="architecture 'gated' is not supported"):
        load_sae(write_folder(tmp_path / "gated", v6_cfg("gated"), weights))
    with pytest.raises(ValueError, match=r"lack \['threshold'\]"):
        load_sae(write_folder(tmp_path / "nothr", v6_cfg("jumprelu"), weights))
    with pytest.raises(ValueError, match=r"unexpected tensors \['extra'\]"):
        load_sae(write_folder(tmp_path / "extra", v6_cfg("standard"), dict(weights, extra=torch.ones(2))))
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "cfg.json").write_text("{not json")
    save_file(weights, str(tmp_path / "badjson" / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_sae(tmp_path / "badjson")

    native = trained("relu").save(tmp_path / "native")
    cfg = json.loads((native / "cfg.json").read_text())
    cfg["saefast"]["config"]["d_sae"] = 64
    (native / "cfg.json").write_text(json.dumps(cfg))
    msg = r"W_enc has shape \(12, 40\) but the config says d_in=12, d_sae=64, so it must be \[12, 64\]"
    with pytest.raises(ValueError, match=msg):
        load_sae(native)

    sparsify_cfg = {"activation": "topk", "k": 4, "d_in": D_IN, "num_latents": D_SAE, "skip_connection": True}
    sp = {"encoder.weight": weights["W_enc"].t().contiguous(), "encoder.bias": weights["b_enc"],
          "W_dec": weights["W_dec"], "b_dec": weights["b_dec"]}
    with pytest.raises(ValueError, match="skip_connection=True is not supported"):
        load_sae(write_folder(tmp_path / "skip", sparsify_cfg, sp, "sae.safetensors"))
    sparsify_cfg = {"activation": "topk", "d_in": D_IN, "num_latents": D_SAE}
    with pytest.raises(ValueError, match=r"missing \['k'\]"):
        load_sae(write_folder(tmp_path / "nok", sparsify_cfg, sp, "sae.safetensors"))
    with pytest.raises(TypeError, match="history must be a dict"):
        trained("relu").save(tmp_path / "h", history=[1, 2])


# ------------------------------------------------------------------------------------------------
# SAELens itself (only where it is installed)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["batchtopk", "topk", "relu", "jumprelu"])
def test_saelens_loads_saefast_folders(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    sae = trained(arch, jumprelu_init_threshold=0.05)
    folder = sae.save(tmp_path / arch)
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    expected = {"batchtopk": "JumpReLUSAE", "jumprelu": "JumpReLUSAE", "topk": "TopKSAE", "relu": "StandardSAE"}
    assert type(theirs).__name__ == expected[arch]
    x = data()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x))
        torch.testing.assert_close(theirs(x), sae.reconstruct(x))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_loading_non_finite_weights_is_refused_naming_the_tensor(tmp_path, bad):
    sae = trained("batchtopk")
    folder = sae.save(tmp_path / "sae")
    weights = load_file(str(folder / sio.WEIGHTS_FILENAME))
    weights["W_dec"][3, 1] = bad
    save_file(weights, str(folder / sio.WEIGHTS_FILENAME))
    with pytest.raises(ValueError, match=r"sae_weights.safetensors: W_dec holds 1 NaN or inf"):
        load_sae(folder)


@pytest.mark.parametrize("name", [sio.WEIGHTS_FILENAME, sio.STATE_FILENAME])
@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_truncated_weights_are_refused_naming_the_file(tmp_path, name, keep):
    folder = trained("batchtopk").save(tmp_path / "sae")
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[:int(keep * len(data))])
    with pytest.raises(ValueError, match=f"{folder / name} is truncated or damaged.*save the SAE again") as info:
        load_sae(folder)
    assert "\n" not in str(info.value)


def test_truncated_reference_checkpoint_is_refused_naming_the_file(tmp_path):
    state_dict, cfg = sio.to_reference_state_dict(trained("batchtopk"))
    folder = tmp_path / "ref"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({k: str(v) if isinstance(v, torch.dtype) else v
                                                    for k, v in cfg.items()}))
    torch.save(state_dict, folder / "sae.pt")
    load_sae(folder)  # the intact one loads
    (folder / "sae.pt").write_bytes((folder / "sae.pt").read_bytes()[:300])
    with pytest.raises(ValueError, match=f"{folder / 'sae.pt'} is truncated or damaged"):
        load_sae(folder)


def test_full_disk_while_saving_names_the_file_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    sae = trained("topk")
    folder = tmp_path / "sae"

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(sio, "save_file", full)
    with pytest.raises(OSError, match=f"no space left on device while writing {folder / sio.WEIGHTS_FILENAME}$"):
        sae.save(folder)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# The classic SAE API's checkpoints: weights.pt + config.json + history.json
# ------------------------------------------------------------------------------------------------

class PlainClassicSAE(torch.nn.Module):
    """The classic SAE API in plain dense PyTorch: forward centres x by b_dec; the base SAE encodes
    relu(x_c @ W_enc + b_enc), the BatchTopK one relu(x_c @ W_enc) and keeps the batch's B*k
    largest entries; decode f @ W_dec + b_dec. Buffers as the classic code registers them (float
    zeros for the counter)."""

    def __init__(self, top_k=None, seed=0):
        super().__init__()
        self.top_k = top_k
        for name, tensor in random_weights(seed).items():
            setattr(self, name, torch.nn.Parameter(tensor))
        self.register_buffer("ever_fired", torch.zeros(D_SAE, dtype=torch.bool))
        if top_k is not None:
            self.register_buffer("num_batches_not_active", torch.zeros(D_SAE))

    def forward(self, x):
        x2 = x.reshape(-1, D_IN) - self.b_dec
        if self.top_k is None:
            f = F.relu(x2 @ self.W_enc + self.b_enc)
        else:
            pre = F.relu(x2 @ self.W_enc)
            top = pre.flatten().topk(self.top_k * x2.shape[0])
            f = torch.zeros_like(pre.flatten()).scatter(0, top.indices, top.values).reshape(pre.shape)
        return (f @ self.W_dec + self.b_dec).reshape(x.shape), f.reshape(*x.shape[:-1], D_SAE)

    @torch.no_grad()
    def update_inactive_features(self, features):
        fired = (features.reshape(-1, D_SAE) > 0).any(0)
        self.ever_fired |= fired
        if self.top_k is not None:
            self.num_batches_not_active += (~fired).float()
            self.num_batches_not_active[fired] = 0


def classic_config(top_k=None, **overrides):
    """What the classic SAEConfig.to_dict() writes (no architecture; hook_layer as a string)."""
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "l1_coefficient": 0.01, "dtype": "float32", "device": "cuda",
           "use_error_term": False, "hook_layer": "14", "hook_name": "hook_mlp_out",
           "hook_spec": "blocks.14.hook_mlp_out", "top_k": top_k, "top_k_aux": None if top_k is None else 2,
           "n_batches_to_dead": 3, "aux_penalty": 1 / 32}
    cfg.update(overrides)
    return cfg


def write_classic(folder, plain, cfg, history=None):
    folder.mkdir(parents=True)
    torch.save(plain.state_dict(), folder / "weights.pt")
    (folder / "config.json").write_text(json.dumps(cfg))
    if history is not None:
        (folder / "history.json").write_text(json.dumps(history))
    return folder


def test_classic_batchtopk_checkpoint_loads_three_ways(tmp_path):
    plain = PlainClassicSAE(top_k=4)
    for step in range(5):  # counters the way the classic loop leaves them (float, some dead)
        plain.update_inactive_features(plain(data(6, seed=step) * (step + 1) / 4)[1])
    assert plain.num_batches_not_active.max() >= 3 and plain.ever_fired.any()
    history = {"loss": [0.5, 0.25], "dead_pct": [0.0, 12.5]}
    folder = write_classic(tmp_path / "ckpt", plain, classic_config(top_k=4), history)

    loaded = [BatchTopKSAE.load(folder), load_sae(folder), saefast.SAE.load(folder)]
    with_history = BatchTopKSAE.load(folder, load_history=True)
    assert isinstance(with_history, tuple) and with_history[1] == history
    loaded.append(with_history[0])
    x = 1 + data(10, seed=9).reshape(2, 5, D_IN)
    x_recon, features = plain(x)
    for sae in loaded:
        assert type(sae) is BatchTopKSAE and sae.config.top_k == 4 and sae.config.top_k_aux == 2
        assert sae.config.hook_spec == "blocks.14.hook_mlp_out" and sae.config.hook_layer == "14"
        assert sae.device.type == "cpu" and sae.dtype == torch.float32
        assert torch.equal(sae.num_batches_not_active, plain.num_batches_not_active.long())
        assert torch.equal(sae.ever_fired, plain.ever_fired)
        assert sae.count_dead_features() == int((plain.num_batches_not_active >= 3).sum())
        ours_recon, ours_features = sae(x)
        torch.testing.assert_close(ours_features, features)
        torch.testing.assert_close(ours_recon, x_recon)
    assert sio.sae_folder_kind(folder) == "classic"


def test_classic_base_sae_checkpoint_is_a_relu_sae(tmp_path):
    plain = PlainClassicSAE(top_k=None, seed=2)
    folder = write_classic(tmp_path / "relu", plain, classic_config(dtype="torch.bfloat16"))
    for sae in (load_sae(folder), saefast.SAE.load(folder), VanillaSAE.load(folder)):
        assert type(sae) is VanillaSAE and sae.dtype == torch.bfloat16
        x = data(7, seed=3)
        expected = plain(x)[1]
        torch.testing.assert_close(sae.encode(x.to(torch.bfloat16)).float(), expected, rtol=2e-2, atol=2e-2)
    fp32 = load_sae(folder, dtype="float32")
    torch.testing.assert_close(fp32.encode(data(7, seed=3)), plain(data(7, seed=3))[1])
    assert VanillaSAE.load(folder, load_history=True)[1] is None  # no history.json
    with pytest.raises(ValueError, match="needs top_k"):  # loading it as a BatchTopK SAE says what is missing
        BatchTopKSAE.load(folder)


def test_classic_checkpoint_refuses_pickled_objects_and_bad_counters(tmp_path, caplog):
    plain = PlainClassicSAE(top_k=4)
    state = dict(plain.state_dict(), note=Note("not a tensor"))
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save(state, folder / "weights.pt")
    (folder / "config.json").write_text(json.dumps(classic_config(top_k=4)))
    with pytest.raises(ValueError, match=r"weights.pt cannot be read as a weights-only state dict"):
        load_sae(folder)

    bad = PlainClassicSAE(top_k=4)
    bad.num_batches_not_active[0] = 1.5
    with pytest.raises(ValueError, match="num_batches_not_active must hold whole numbers"):
        load_sae(write_classic(tmp_path / "frac", bad, classic_config(top_k=4)))

    extra = PlainClassicSAE(top_k=4)
    extra.register_buffer("mystery", torch.ones(3))
    with pytest.raises(ValueError, match=r"unexpected tensors \['mystery'\]"):
        load_sae(write_classic(tmp_path / "extra", extra, classic_config(top_k=4)))

    biased = PlainClassicSAE(top_k=4)  # its encode ignores b_enc: saefast drops it, loudly
    folder = write_classic(tmp_path / "biased", biased, classic_config(top_k=4, some_new_option=1))
    with caplog.at_level("WARNING"):
        sae = load_sae(folder)
    assert "b_enc is nonzero" in caplog.text and "some_new_option" in caplog.text
    assert torch.count_nonzero(sae.b_enc) == 0
    torch.testing.assert_close(sae(data(5))[1], biased(data(5))[1])
