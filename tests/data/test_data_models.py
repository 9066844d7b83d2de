"""saefast.data.models: the TL 3.x / 4.x adapter, hook lookup, run_to_hook with stop_at_layer."""
import pytest

pytest.importorskip("transformer_lens")  # absent on the lent GPU machine

import torch

from data_helpers import TINY_CFG, block_call_counter, make_model
from saefast.data import models as M


def test_tiny_model_matches_installed_transformer_lens():
    model = make_model()
    expected = "HookedTransformer" if M.tl_has_hooked_transformer() else "TransformerBridge"
    assert type(model).__name__ == expected
    assert M.context_limit(model) == TINY_CFG["n_ctx"]
    assert not model.training


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.2.hook_mlp_out",
                                  "hook_embed"])
def test_run_to_hook_matches_full_cached_run(hook):
    model = make_model()
    tokens = torch.randint(0, TINY_CFG["d_vocab"], (3, 11), generator=torch.Generator().manual_seed(1))
    _, full_cache = model.run_with_cache(tokens)  # every hook, no stop_at_layer
    got = M.run_to_hook(model, tokens, hook)
    assert got.shape == (3, 11, TINY_CFG["d_model"])
    torch.testing.assert_close(got, full_cache[hook], rtol=1e-6, atol=1e-6)
    assert not got.requires_grad


def test_run_to_hook_skips_later_blocks():
    model = make_model()
    tokens = torch.zeros(2, 5, dtype=torch.long)
    with block_call_counter(model) as calls:
        M.run_to_hook(model, tokens, "blocks.0.hook_resid_post")
        assert calls == [0]
        calls.clear()
        M.run_to_hook(model, tokens, "blocks.1.hook_resid_pre")  # block 1 holds the hook; block 2 never runs
        assert calls == [0, 1]
        calls.clear()
        model(tokens)
        assert calls == [0, 1, 2]


def test_per_head_hook_is_flattened():
    model = make_model()
    tokens = torch.randint(0, TINY_CFG["d_vocab"], (2, 6), generator=torch.Generator().manual_seed(2))
    _, cache = model.run_with_cache(tokens)
    z = cache["blocks.1.attn.hook_z"]
    assert z.shape == (2, 6, TINY_CFG["n_heads"], TINY_CFG["d_head"])
    got = M.run_to_hook(model, tokens, "blocks.1.attn.hook_z")
    torch.testing.assert_close(got, z.flatten(2))
    assert M.hook_d_in(model, "blocks.1.attn.hook_z") == TINY_CFG["n_heads"] * TINY_CFG["d_head"]


def test_hook_layer_and_stop_layer():
    assert M.hook_layer("blocks.7.hook_resid_pre") == 7
    assert M.hook_layer("hook_embed") == -1
    assert M.hook_layer("ln_final.hook_normalized") is None
    assert M.stop_layer_for(["blocks.2.hook_mlp_out", "blocks.5.hook_resid_pre"]) == 6
    assert M.stop_layer_for(["hook_embed"]) == 0
    assert M.stop_layer_for(["blocks.1.hook_resid_pre", "ln_final.hook_normalized"]) is None


def test_unknown_hook_lists_valid_names():
    model = make_model()
    assert "blocks.1.hook_resid_pre" in M.hook_names(model)
    with pytest.raises(ValueError, match=r"unknown hook 'blocks.1.hook_resid_pr'.*"
                                         r"Did you mean 'blocks.1.hook_resid_pre'.*"
                                         r"Valid hook names: .*blocks\.\{0\.\.2\}\.hook_resid_pre"):
        M.check_hook(model, "blocks.1.hook_resid_pr")
    with pytest.raises(ValueError, match="attention maps"):
        M.check_hook(model, "blocks.0.attn.hook_pattern")
    with pytest.raises(TypeError, match="hook_name must be a string"):
        M.check_hook(model, 3)
    with pytest.raises(TypeError, match="has no hook_dict"):
        M.hook_names(torch.nn.Linear(2, 2))


def test_d_in_and_context_checks():
    model = make_model()
    assert M.hook_d_in(model, "blocks.1.hook_resid_pre") == TINY_CFG["d_model"]
    M.check_d_in(model, "blocks.1.hook_resid_pre", TINY_CFG["d_model"])
    with pytest.raises(ValueError, match=r"d_in=24 does not match hook 'blocks.1.hook_resid_pre'.*width 16"):
        M.check_d_in(model, "blocks.1.hook_resid_pre", 24)
    M.check_context_size(model, TINY_CFG["n_ctx"])
    with pytest.raises(ValueError, match=r"context_size=33 is larger than the model's context of 32"):
        M.check_context_size(model, 33)


def test_tiny_model_rejects_incomplete_config():
    with pytest.raises(ValueError, match=r"cfg is missing \['n_ctx'\]"):
        M.tiny_model({k: v for k, v in TINY_CFG.items() if k != "n_ctx"})
    with pytest.raises(TypeError, match="cfg must be a dict"):
        M.tiny_model("gpt2")


@pytest.mark.skipif(M.tl_has_hooked_transformer(), reason="TL 3.x loads hub names only, not local folders")
def test_load_model_from_local_hf_folder(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    from data_helpers import make_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                    bos_token_id=1, eos_token_id=1, pad_token_id=0))
    hf.eval()
    hf.save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    model = M.load_model(str(tmp_path))
    assert M.context_limit(model) == 16
    tokens = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(3))
    resid = M.run_to_hook(model, tokens, "blocks.1.hook_resid_pre")
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states[1]  # input of block 1
    torch.testing.assert_close(resid, hidden, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must be a model name"):
        M.load_model("")
