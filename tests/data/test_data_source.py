"""saefast.data.source.ModelActivationSource: activations line up with tokens, padding and BOS are
dropped, resume is exact, bad input fails before any work."""
import pytest

datasets = pytest.importorskip("datasets")  # the lent GPU machine has no datasets
pytest.importorskip("transformer_lens")

import json

import torch

from data_helpers import BOS, PAD, TINY_CFG, block_call_counter, make_model, make_texts, make_tokenizer
from saefast.data.source import ActivationBatch, ModelActivationSource, estimate_norm_scaling_factor
from saefast.data.tokens import TokenWindows

HOOK = "blocks.1.hook_resid_post"


def make_windows(pack=True, n_docs=14, ctx=12, seed=0, **kw):
    texts = make_texts(n_docs, seed=seed)
    return TokenWindows(datasets.Dataset.from_dict({"text": texts}), make_tokenizer(), ctx, pack=pack, **kw)


def all_windows(windows):
    out = []
    while True:
        try:
            out.append(windows.next_with_length())
        except StopIteration:
            return out


@pytest.mark.parametrize("pack", [True, False])
def test_rows_line_up_with_a_direct_model_run(pack):
    model = make_model()
    windows = list(all_windows(make_windows(pack=pack)))
    tokens = torch.stack([t for t, _ in windows])
    n_real = torch.tensor([n for _, n in windows])
    assert (n_real < tokens.shape[1]).any()  # some windows are padded
    _, cache = model.run_with_cache(tokens)  # full run, no names filter
    expected_acts = cache[HOOK]
    positions = torch.arange(tokens.shape[1])
    expected_keep = (positions[None] < n_real[:, None]) & (tokens != BOS)

    source = ModelActivationSource(model, HOOK, make_windows(pack=pack), batch_size=8, model_batch_size=3,
                                   buffer_tokens=40, seed=1, with_tokens=True)
    batches = list(source)
    assert all(isinstance(b, ActivationBatch) and b.acts.shape == (8, TINY_CFG["d_model"]) for b in batches)
    acts = torch.cat([b.acts for b in batches])
    win = torch.cat([b.window_ids for b in batches])
    pos = torch.cat([b.positions for b in batches])
    tok = torch.cat([b.token_ids for b in batches])
    assert acts.dtype == torch.float32
    assert torch.equal(tok, tokens[win, pos])
    assert expected_keep[win, pos].all()  # no padding, no BOS
    served = win * tokens.shape[1] + pos
    assert served.unique().numel() == served.numel()
    assert int(expected_keep.sum()) - served.numel() < 8  # only the last < batch_size rows are dropped
    torch.testing.assert_close(acts, expected_acts[win, pos], rtol=1e-5, atol=1e-5)
    # Shuffled across sequences: consecutive rows come from different windows.
    assert win[:8].unique().numel() > 2


def test_plain_batches_and_protocol():
    model = make_model()
    source = ModelActivationSource(model, HOOK, make_windows(), batch_size=6, model_batch_size=2, buffer_tokens=30)
    assert source.d_in == TINY_CFG["d_model"]
    assert iter(source) is source
    batch = next(source)
    assert isinstance(batch, torch.Tensor) and batch.shape == (6, 16) and batch.dtype == torch.float32
    json.dumps(source.state_dict())


def test_model_runs_only_up_to_the_hook():
    model = make_model()
    source = ModelActivationSource(model, "blocks.0.hook_resid_post", make_windows(), batch_size=4,
                                   model_batch_size=4, buffer_tokens=16, background=False)
    with block_call_counter(model) as calls:
        next(source)
    assert calls and set(calls) == {0}


@pytest.mark.parametrize("k", [0, 1, 4, 5, 9])
def test_resume_matches_uninterrupted_run(k):
    model = make_model()

    def build(background):
        return ModelActivationSource(model, HOOK, make_windows(pack=False, ctx=10), batch_size=5,
                                     model_batch_size=3, buffer_tokens=20, seed=4, background=background)

    full = torch.cat(list(build(False)))
    first = build(True)
    head = [next(first) for _ in range(k)]
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    second = build(True)
    second.load_state_dict(state)
    rest = list(second)
    assert torch.equal(torch.cat(head + rest), full)


def test_bad_input_fails_before_any_work():
    model = make_model()
    windows = make_windows()
    with pytest.raises(ValueError, match="unknown hook 'blocks.9.hook_resid_pre'.*Valid hook names"):
        ModelActivationSource(model, "blocks.9.hook_resid_pre", windows, batch_size=4)
    with pytest.raises(ValueError, match=r"d_in=32 does not match hook"):
        ModelActivationSource(model, HOOK, windows, batch_size=4, d_in=32)
    with pytest.raises(ValueError, match=r"context_size=33 is larger than the model's context of 32"):
        ModelActivationSource(model, HOOK, make_windows(ctx=33), batch_size=4)
    with pytest.raises(TypeError, match="windows must be a saefast.data.tokens.TokenWindows"):
        ModelActivationSource(model, HOOK, [torch.zeros(4)], batch_size=4)
    assert windows.state_dict()["windows"] == 0
    empty_docs = TokenWindows(datasets.Dataset.from_dict({"text": ["", ""]}), make_tokenizer(), 8)
    with pytest.raises(ValueError, match="fewer than batch_size=4 tokens"):
        next(ModelActivationSource(model, HOOK, empty_docs, batch_size=4, background=False))
    big_ids = TokenWindows(datasets.Dataset.from_dict({"ids": [[3, 99, 4]]}), None, 4, tokens_column="ids",
                           bos_token_id=BOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="token id 99 is outside the model's vocabulary of 40"):
        next(ModelActivationSource(model, HOOK, big_ids, batch_size=2, background=True))


def test_resume_state_from_another_config_is_refused():
    model = make_model()
    state = ModelActivationSource(model, HOOK, make_windows(), batch_size=4).state_dict()
    other = ModelActivationSource(model, "blocks.0.hook_resid_pre", make_windows(), batch_size=4)
    with pytest.raises(ValueError, match="saved source has hook_name='blocks.1.hook_resid_post'"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="saved buffer has batch_size=4 but this one has batch_size=8"):
        ModelActivationSource(model, HOOK, make_windows(), batch_size=8).load_state_dict(state)


def test_norm_scaling_factor():
    g = torch.Generator().manual_seed(0)
    batches = [3.0 * torch.randn(50, 16, generator=g) for _ in range(4)]
    factor = estimate_norm_scaling_factor(iter(batches), n_batches=3)
    x = torch.cat(batches[:3])
    assert factor == pytest.approx((16 / x.pow(2).sum(-1).mean()).sqrt().item(), rel=1e-5)
    scaled = x * factor
    assert scaled.pow(2).sum(-1).mean().item() == pytest.approx(16, rel=1e-4)
    with pytest.raises(ValueError, match="the source is empty"):
        estimate_norm_scaling_factor(iter([]), n_batches=2)


def test_evals_on_the_same_model_do_not_leak_into_background_batches():
    from data_helpers import LinearSAE
    from saefast.evals.model_evals import spliced_ce_eval

    model = make_model()

    def build(background):
        return ModelActivationSource(model, HOOK, make_windows(n_docs=30, ctx=16), batch_size=8,
                                     model_batch_size=1, buffer_tokens=16, seed=2, background=background)

    expected = torch.cat(list(build(False)))
    source = build(True)
    tokens = torch.randint(3, TINY_CFG["d_vocab"], (2, 16), generator=torch.Generator().manual_seed(0))
    got = []
    for batch in source:
        got.append(batch)
        spliced_ce_eval(model, LinearSAE(TINY_CFG["d_model"], "zero"), tokens, HOOK)  # hooks on the same model
    assert torch.equal(torch.cat(got), expected)
