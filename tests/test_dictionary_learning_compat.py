"""dictionary_learning checkpoints (trainer_N/ae.pt + config.json) load through load_sae as saefast
SAEs whose encodes match a plain PyTorch implementation of each dictionary's maths, on both
backends: encoder bias and thresholds included, decoder rows not renormalised."""
import json

import pytest
import torch
import torch.nn.functional as F

from saefast import BatchTopKSAE, JumpReLUSAE, MatryoshkaBatchTopKSAE, SAEConfig, TopKSAE, VanillaSAE, load_sae
from saefast import io as sio

D_IN, D_SAE, K = 12, 40, 5


def data(n=33, seed=0):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def linear_state(seed, bias_key):
    """encoder / decoder as nn.Linear stores them; decoder rows deliberately not unit norm."""
    g = torch.Generator().manual_seed(seed)
    return {"encoder.weight": torch.randn(D_SAE, D_IN, generator=g) * 0.4,
            "encoder.bias": torch.randn(D_SAE, generator=g) * 0.2,
            "decoder.weight": torch.randn(D_IN, D_SAE, generator=g) * 0.3,
            bias_key: torch.randn(D_IN, generator=g) * 0.1}


def make_state(dict_class, seed=0, threshold=0.3):
    if dict_class == "AutoEncoder":
        return linear_state(seed, "bias")
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        state = linear_state(seed, "b_dec")
        state.update(k=torch.tensor(K, dtype=torch.int), threshold=torch.tensor(threshold, dtype=torch.float32))
        return state
    g = torch.Generator().manual_seed(seed)
    state = {"W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.4, "b_enc": torch.randn(D_SAE, generator=g) * 0.2,
             "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.3, "b_dec": torch.randn(D_IN, generator=g) * 0.1,
             "threshold": 0.1 + 0.4 * torch.rand(D_SAE, generator=g)}
    if dict_class == "MatryoshkaBatchTopKSAE":
        state.update(k=torch.tensor(K, dtype=torch.int), threshold=torch.tensor(threshold, dtype=torch.float32),
                     group_sizes=torch.tensor([5, 10, 25]))
    return state


def plain_encode(dict_class, state, x):
    """Each dictionary's encode, dense, as dictionary_learning defines it (default arguments)."""
    if dict_class == "JumpReluAutoEncoder":
        pre = x @ state["W_enc"] + state["b_enc"]
        return F.relu(pre * (pre > state["threshold"]))
    if dict_class == "MatryoshkaBatchTopKSAE":  # every group active, as a loaded dictionary has them
        post = F.relu((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
        return post * (post > state["threshold"])
    b_dec = state["bias" if dict_class == "AutoEncoder" else "b_dec"]
    post = F.relu(F.linear(x - b_dec, state["encoder.weight"], state["encoder.bias"]))
    if dict_class == "AutoEncoder":
        return post
    if dict_class == "BatchTopKSAE":
        return post * (post > state["threshold"])
    top = post.topk(int(state["k"]), dim=-1)
    return torch.zeros_like(post).scatter(-1, top.indices, top.values)


def plain_decode(dict_class, state, f):
    if dict_class in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"):
        return f @ state["W_dec"] + state["b_dec"]
    return F.linear(f, state["decoder.weight"]) + state["bias" if dict_class == "AutoEncoder" else "b_dec"]


TRAINERS = {"AutoEncoder": "StandardTrainerAprilUpdate", "AutoEncoderTopK": "TopKTrainer",
            "BatchTopKSAE": "BatchTopKTrainer", "JumpReluAutoEncoder": "JumpReluTrainer",
            "MatryoshkaBatchTopKSAE": "MatryoshkaBatchTopKTrainer"}
CLASSES = {"AutoEncoder": VanillaSAE, "AutoEncoderTopK": TopKSAE, "BatchTopKSAE": BatchTopKSAE,
           "JumpReluAutoEncoder": JumpReLUSAE, "MatryoshkaBatchTopKSAE": MatryoshkaBatchTopKSAE}


def write_trainer(folder, class_name, state, **trainer_overrides):
    folder.mkdir(parents=True)
    torch.save(state, folder / "ae.pt")
    trainer = {"trainer_class": TRAINERS.get(class_name, "GatedSAETrainer"), "dict_class": class_name,
               "activation_dim": D_IN, "dict_size": D_SAE, "lr": 1e-4, "steps": 1000, "seed": 0, "device": "cuda:0",
               "layer": 3, "lm_name": "EleutherAI/pythia-70m-deduped", "submodule_name": "resid_post_layer_3"}
    if "k" in state:
        trainer["k"] = int(state["k"])
    trainer.update(trainer_overrides)
    cfg = {"trainer": trainer, "buffer": {"d_submodule": D_IN, "io": "out", "n_ctxs": 3000, "ctx_len": 128,
                                          "refresh_batch_size": 512, "out_batch_size": 8192, "device": "cuda:0"}}
    (folder / "config.json").write_text(json.dumps(cfg, indent=4))
    return folder


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dict_class", list(CLASSES))
def test_each_dictionary_loads_with_identical_encodes(tmp_path, monkeypatch, dict_class, backend):
    monkeypatch.setenv("SAEFAST_BACKEND", backend)
    state = make_state(dict_class, seed=1)
    folder = write_trainer(tmp_path / "run" / "trainer_0", dict_class, state)
    sae = load_sae(folder)
    assert type(sae) is CLASSES[dict_class] and not sae.training
    c = sae.config
    assert (c.d_in, c.d_sae, c.model_name, c.context_size) == (D_IN, D_SAE, "EleutherAI/pythia-70m-deduped", 128)
    assert c.hook_spec == "blocks.3.hook_resid_post" and c.b_enc_trained
    assert c.apply_b_dec_to_input is (dict_class != "JumpReluAutoEncoder")
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        assert c.top_k == K
    if dict_class in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        assert sae.inference_threshold == pytest.approx(0.3)
    if dict_class == "MatryoshkaBatchTopKSAE":
        assert list(c.prefix_sizes) == [5, 15, 40]  # the cumulative group sizes
    for n in (1, 33):
        x = data(n, seed=n)
        expected = plain_encode(dict_class, state, x)
        ours = sae.encode(x)
        assert torch.equal(ours != 0, expected != 0), "a different set of latents is active"
        assert bool((expected != 0).any())
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sae.reconstruct(x), plain_decode(dict_class, state, expected), rtol=1e-5,
                                   atol=1e-5)
    if dict_class == "AutoEncoder":  # decoder rows stay as trained: no renormalisation at load
        assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


def test_run_folder_with_one_trainer_loads_and_with_several_asks_which(tmp_path, caplog):
    state = make_state("BatchTopKSAE", seed=2, threshold=-1.0)  # threshold never estimated
    write_trainer(tmp_path / "one" / "trainer_0", "BatchTopKSAE", state)
    assert sio.sae_folder_kind(tmp_path / "one") == "dictionary_learning"
    with caplog.at_level("WARNING"):
        sae = load_sae(tmp_path / "one")
    assert "never estimated" in caplog.text and sae.inference_threshold == 0.0
    x = data()
    torch.testing.assert_close(sae.encode(x), plain_encode("BatchTopKSAE", state, x))  # every positive entry
    write_trainer(tmp_path / "two" / "trainer_0", "AutoEncoder", make_state("AutoEncoder"))
    write_trainer(tmp_path / "two" / "trainer_1", "AutoEncoder", make_state("AutoEncoder"))
    with pytest.raises(ValueError, match=r"holds 2 dictionary_learning trainers \(trainer_0, trainer_1\); pass one"):
        load_sae(tmp_path / "two")


def test_configs_without_dict_class_dtype_override_and_bad_checkpoints(tmp_path):
    state = make_state("AutoEncoderTopK", seed=3)
    folder = write_trainer(tmp_path / "a" / "trainer_0", "AutoEncoderTopK", state, dict_class=None,
                           submodule_name="mlp_out_layer_3")
    sae = load_sae(folder, dtype="bfloat16")
    assert type(sae) is TopKSAE and sae.dtype == torch.bfloat16 and sae.config.hook_spec == "blocks.3.hook_mlp_out"

    with pytest.raises(ValueError, match=r"dict_class 'GatedAutoEncoder' is not supported; saefast loads"):
        load_sae(write_trainer(tmp_path / "gated" / "trainer_0", "GatedAutoEncoder", make_state("AutoEncoder")))
    with pytest.raises(ValueError, match=r"config says dict_size=64 but the weights have 40"):
        load_sae(write_trainer(tmp_path / "size" / "trainer_0", "AutoEncoder", make_state("AutoEncoder"),
                               dict_size=64))
    no_bias = make_state("AutoEncoder")
    del no_bias["bias"]
    with pytest.raises(ValueError, match=r"lacks 'bias', which a AutoEncoder holds"):
        load_sae(write_trainer(tmp_path / "nobias" / "trainer_0", "AutoEncoder", no_bias))
    bad = make_state("JumpReluAutoEncoder")
    bad["threshold"][0] = float("nan")
    with pytest.raises(ValueError, match="threshold holds 1 NaN"):
        load_sae(write_trainer(tmp_path / "nan" / "trainer_0", "JumpReluAutoEncoder", bad))
    pickled = write_trainer(tmp_path / "pickled" / "trainer_0", "AutoEncoder", make_state("AutoEncoder"))
    torch.save({"model": SAEConfig(d_in=4, d_sae=8, architecture="relu", device="cpu")}, pickled / "ae.pt")
    with pytest.raises(ValueError, match="ae.pt cannot be read as a weights-only state dict"):
        load_sae(pickled)
