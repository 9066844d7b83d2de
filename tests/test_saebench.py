"""saefast SAEs as SAEBench custom SAEs.

sae-bench does not install beside saefast (it pins datasets < 4 and numpy < 2, pulls its own torch,
and imports transformer-lens' HookedTransformer, which TL 4 removed), so these tests check the
interface SAEBench reads field by field and run the steps of its custom-SAE check (decoder norms
within its tolerance; encode / decode on [batch, seq, d_in] activations cached from a model up to
``hook_layer + 1``; forward on the flattened activations equal to decode(encode(.)); the SAE cast
to the model's dtype) on a tiny random transformer-lens model.
"""
import dataclasses
import json

import pytest
import torch
from torch import nn

from saefast import BatchTopKSAE, JumpReLUSAE, SAEConfig, TopKSAE, VanillaSAE, create_sae, load_sae
from saefast.config import variant_class
from saefast.data.models import tiny_model
from saefast.saebench import SAEBenchSAE, to_saebench

D_IN, D_SAE, LAYER = 16, 48, 1
HOOK = f"blocks.{LAYER}.hook_resid_post"
# The fields of SAEBench's custom-SAE config (its evals read them, or SAELens internals do).
SAEBENCH_FIELDS = {
    "model_name": str, "d_in": int, "d_sae": int, "hook_layer": int, "hook_name": str, "context_size": (int, type(None)),
    "hook_head_index": type(None), "architecture": str, "apply_b_dec_to_input": bool,
    "finetuning_scaling_factor": bool, "activation_fn_str": str, "activation_fn_kwargs": dict, "prepend_bos": bool,
    "normalize_activations": str, "dtype": str, "device": str, "model_from_pretrained_kwargs": dict,
    "dataset_path": str, "dataset_trust_remote_code": bool, "seqpos_slice": tuple, "training_tokens": int,
    "sae_lens_training_version": (str, type(None)), "neuronpedia_id": (str, type(None)),
}


def trained(arch, steps=4, **extra):
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, top_k=4 if variant_class(arch).needs_top_k else None,
                    device="cpu", seed=0, hook_layer=LAYER, hook_name="hook_resid_post", model_name="tiny",
                    context_size=12, **extra)
    sae = create_sae(cfg)
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        out = sae.training_forward(torch.randn(64, D_IN, generator=g))
        opt.zero_grad()
        out["loss"].backward()
        sae.project_decoder_gradients()
        opt.step()
        sae.normalize_decoder()
    return sae


def check_decoder_norms(W_dec):
    """SAEBench's rule: every decoder row within 1e-5 of norm 1 (1e-2 in 16-bit)."""
    norms = torch.norm(W_dec, dim=1).to(dtype=W_dec.dtype)
    tol = 1e-2 if W_dec.dtype in (torch.bfloat16, torch.float16) else 1e-5
    return torch.allclose(norms, torch.ones_like(norms), atol=tol)


@pytest.mark.parametrize("arch", ["batchtopk", "topk", "relu", "jumprelu", "matryoshka_batchtopk"])
def test_interface_field_by_field(arch):
    sae = trained(arch)
    custom = to_saebench(sae)
    assert isinstance(custom, nn.Module)
    for name in ("encode", "decode", "forward"):
        assert callable(getattr(custom, name))
    for name, shape in (("W_enc", (D_IN, D_SAE)), ("W_dec", (D_SAE, D_IN)), ("b_enc", (D_SAE,)), ("b_dec", (D_IN,))):
        param = getattr(custom, name)
        assert isinstance(param, nn.Parameter) and tuple(param.shape) == shape, name
        assert param is getattr(sae, name), f"{name} must be the SAE's own parameter (shared, not copied)"
    assert check_decoder_norms(custom.W_dec.data)
    assert custom.dtype == torch.float32 and custom.device == torch.device("cpu")
    cfg = custom.cfg
    for name, types in SAEBENCH_FIELDS.items():
        assert isinstance(getattr(cfg, name), types), (name, getattr(cfg, name))
    assert (cfg.model_name, cfg.d_in, cfg.d_sae, cfg.hook_layer, cfg.hook_name, cfg.context_size) == \
        ("tiny", D_IN, D_SAE, LAYER, HOOK, 12)
    assert cfg.architecture == {"batchtopk": "batch_topk", "topk": "topk", "relu": "standard", "jumprelu": "jumprelu",
                                "matryoshka_batchtopk": "matryoshka_batch_topk"}[arch]
    assert (cfg.activation_fn_str, cfg.activation_fn_kwargs) == (("topk", {"k": 4}) if arch == "topk" else ("relu", {}))
    assert cfg.dtype == "float32" and cfg.apply_b_dec_to_input is True
    as_dict = cfg.to_dict()
    assert set(as_dict) == set(SAEBENCH_FIELDS) and json.loads(json.dumps(as_dict, default=list))
    cfg.metadata = object()  # SAEBench attaches this when it standardises the config; to_dict leaves it out
    assert "metadata" not in cfg.to_dict()


@pytest.mark.parametrize("arch", ["batchtopk", "topk", "relu", "jumprelu"])
def test_saebench_custom_sae_check_on_a_tiny_model(arch):
    model = tiny_model(dict(d_model=D_IN, d_head=4, n_heads=4, n_layers=3, n_ctx=16, d_vocab=40, seed=0))
    custom = to_saebench(trained(arch))
    tokens = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[custom.cfg.hook_name],
                                        stop_at_layer=custom.cfg.hook_layer + 1)
        acts = cache[custom.cfg.hook_name]
        assert acts.shape == (2, 11, D_IN)
        encoded = custom.encode(acts)
        decoded = custom.decode(encoded)
        assert encoded.shape == (2, 11, D_SAE) and decoded.shape == acts.shape
        reconstructed = custom(acts.reshape(-1, D_IN)).reshape(acts.shape)
        torch.testing.assert_close(reconstructed, decoded)
        assert float((encoded[:, 1:] > 0).float().sum(-1).mean()) > 0
        # inference codes: one token's encoding does not depend on the rest of the batch
        torch.testing.assert_close(custom.encode(acts[0, 3:4]), encoded[0, 3:4])
        # SAEBench casts the SAE to the model's dtype, then feeds it activations
        same = custom.to(device="cpu", dtype=torch.bfloat16)
        assert same is custom and custom.dtype == torch.bfloat16 and custom.cfg.dtype == "bfloat16"
        assert custom.W_dec.dtype == torch.bfloat16 and check_decoder_norms(custom.W_dec.data)
        low = custom.decode(custom.encode(acts))
        assert low.dtype == torch.bfloat16 and low.shape == acts.shape


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_non_unit_decoder_rows_are_folded_into_a_copy(arch, tmp_path):
    sae = trained(arch, **({"jumprelu_init_threshold": 0.05} if arch == "jumprelu" else {}))
    norms = torch.linspace(0.5, 2.0, D_SAE)
    with torch.no_grad():
        sae.W_dec.mul_(norms[:, None])
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    x = torch.randn(40, D_IN, generator=torch.Generator().manual_seed(3))
    custom = to_saebench(sae)
    assert check_decoder_norms(custom.W_dec.data) and not check_decoder_norms(sae.W_dec.data)
    for key, value in sae.state_dict().items():  # the caller's SAE is untouched
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        sae.eval()
        torch.testing.assert_close(custom(x), sae.reconstruct(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(custom.encode(x), sae.encode(x) * norms, rtol=1e-5, atol=1e-5)
    # saving folds them too, so a saved folder always has unit-norm decoder rows
    loaded = load_sae(sae.save(tmp_path / arch)).eval()
    assert check_decoder_norms(loaded.W_dec.data)
    with torch.no_grad():
        torch.testing.assert_close(loaded.reconstruct(x), sae.reconstruct(x), rtol=1e-5, atol=1e-5)
    assert isinstance(custom, SAEBenchSAE)


def test_saes_saebench_cannot_evaluate_faithfully_are_refused(tmp_path, caplog):
    topk = trained("topk")
    with torch.no_grad():
        topk.W_dec.mul_(1.5)
    with pytest.raises(ValueError, match="would change which latents are kept"):
        to_saebench(topk)
    with caplog.at_level("WARNING"):
        topk.save(tmp_path / "topk")  # saved as it is, loudly
    assert "cannot fold them" in caplog.text
    untrained = BatchTopKSAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, top_k=4, device="cpu", model_name="tiny"))
    with pytest.raises(ValueError, match="no learned inference threshold"):
        to_saebench(untrained)
    with pytest.raises(ValueError, match="needs the input to decode"):
        to_saebench(trained("relu", input_unit_norm=True))
    nameless = TopKSAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, top_k=4, architecture="topk", device="cpu"))
    with pytest.raises(ValueError, match="pass model_name="):
        to_saebench(nameless)
    assert to_saebench(nameless, model_name="gpt2").cfg.model_name == "gpt2"
    with pytest.raises(ValueError, match="pass hook_layer="):
        to_saebench(nameless, model_name="gpt2", hook_name="hook_embed")
    assert to_saebench(nameless, model_name="gpt2", hook_name="hook_embed", hook_layer=0).cfg.hook_layer == 0
    with pytest.raises(TypeError, match="saefast SAE"):
        to_saebench(nn.Linear(2, 2))
    assert isinstance(to_saebench(trained("jumprelu")).sae, JumpReLUSAE)
    assert isinstance(to_saebench(trained("relu")).sae, VanillaSAE)
    assert dataclasses.is_dataclass(to_saebench(trained("relu")).cfg)
