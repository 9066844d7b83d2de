"""Several hooks from one model pass: the multi-hook model source, views of one shared source
(one SAE's rows, a transcoder's pairs, a crosscoder's concatenation), exact resume through a view,
and caches holding several hooks."""
import json

import pytest
import torch

from data_helpers import block_call_counter, make_model, make_texts, make_tokenizer
from saefast.data.cache import CachedActivationSource, cache_activations, read_manifest
from saefast.data.source import ActivationPair, ModelActivationSource
from saefast.data.tokens import TokenWindows
from saefast.data.views import SharedSource, pick_concat, pick_hook, pick_pair

datasets = pytest.importorskip("datasets")

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]


def windows():
    ds = datasets.Dataset.from_dict({"text": make_texts(60, 0)})
    return TokenWindows(ds, make_tokenizer(), 16, repeat=True)


def source(hooks, **kw):
    args = dict(batch_size=24, model_batch_size=4, buffer_tokens=96, seed=3, background=False)
    return ModelActivationSource(make_model(), hooks, windows(), **{**args, **kw})


def test_several_hooks_come_from_one_model_pass_and_equal_single_hook_sources():
    multi = source(HOOKS)
    assert multi.d_in is None and multi.d_ins == {h: 16 for h in HOOKS}
    with block_call_counter(make_model()) as calls:
        batches = [next(multi) for _ in range(6)]
    model_passes = calls.count(0)
    assert max(calls) == 1, "the model must stop after the deepest hook's block"
    for hook in HOOKS:
        single = source(hook)
        with block_call_counter(make_model()) as single_calls:
            expected = [next(single) for _ in range(6)]
        assert single_calls.count(0) == model_passes  # the same windows, one pass per chunk either way
        for got, want in zip(batches, expected):
            assert torch.equal(got[hook], want), hook


def test_views_hand_each_consumer_its_batch_and_resume_exactly():
    shared = SharedSource(source(HOOKS))
    sae_view = shared.view(pick_hook(HOOKS[0]), 16, name="sae")
    tc_view = shared.view(pick_pair(HOOKS[1], HOOKS[2]), 16, 16, name="tc")
    cc_view = shared.view(pick_concat(HOOKS), 48, name="cc")
    reference = source(HOOKS)
    for _ in range(3):  # lockstep: one batch each, drawn once
        want = next(reference)
        a, p, c = next(sae_view), next(tc_view), next(cc_view)
        assert torch.equal(a, want[HOOKS[0]])
        assert isinstance(p, ActivationPair) and torch.equal(p.x, want[HOOKS[1]]) and torch.equal(p.target, want[HOOKS[2]])
        assert torch.equal(c, torch.cat([want[h] for h in HOOKS], dim=1))
    state = json.loads(json.dumps(tc_view.state_dict()))  # JSON-safe, as checkpoints store it
    after = [next(sae_view) for _ in range(2)]
    next(tc_view)
    tc_view.load_state_dict(state)  # rewinds the shared source and empties every queue
    assert all(torch.equal(next(sae_view), a) for a in after)
    assert sae_view.hook_names == HOOKS  # other attributes are the shared source's


def test_multi_hook_source_refuses_per_token_metadata_and_repeated_hooks():
    with pytest.raises(ValueError, match="distinct hooks"):
        source([HOOKS[0], HOOKS[0]])
    with pytest.raises(ValueError, match="one hook"):
        source(HOOKS, with_tokens=True)
    with pytest.raises(ValueError, match="unknown hook"):
        source([HOOKS[0], "blocks.1.hook_nothing"])


def test_cache_of_several_hooks_serves_one_hook_or_several(tmp_path):
    folder = cache_activations(source(HOOKS), tmp_path / "acts", n_tokens=120, shard_tokens=50, progress=False,
                               metadata={"hooks": HOOKS})
    manifest = read_manifest(folder)
    assert manifest["hooks"] == HOOKS and manifest["d_ins"] == {h: 16 for h in HOOKS} and manifest["d_in"] is None
    assert manifest["columns"] == HOOKS
    expected = [next(s) for s in [source(HOOKS)] for _ in range(5)]
    rows = {h: torch.cat([b[h] for b in expected])[:120] for h in HOOKS}
    one = CachedActivationSource(folder, 40, shuffle=False, hooks=HOOKS[1], background=False)
    assert one.d_in == 16
    assert torch.equal(torch.cat([next(one) for _ in range(3)]), rows[HOOKS[1]])
    two = CachedActivationSource(folder, 40, shuffle=True, seed=1, hooks=HOOKS[:2], background=False)
    assert two.d_in is None and two.d_ins == {HOOKS[0]: 16, HOOKS[1]: 16}
    batch = next(two)
    # rows stay aligned across hooks: each row of hook 0 is the row of the same token in hook 1
    index = [int((rows[HOOKS[0]] == r).all(1).nonzero()) for r in batch[HOOKS[0]]]
    assert torch.equal(batch[HOOKS[1]], rows[HOOKS[1]][index])
    with pytest.raises(ValueError, match="holds hooks"):
        CachedActivationSource(folder, 40, hooks="blocks.2.hook_resid_post")
