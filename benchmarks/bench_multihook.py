"""Activations of several hooks for one SAE each: one model pass reading every hook (what
``saefast train --hook A --hook B ...`` does) against one pass per hook (one run per hook), the
same tokens and rows per hook either way, with peak memory. The model is a random-weight
transformer-lens model built from a config (no download)."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from conftest import PROFILE, DEVICE, run_contender

# (model config, hooks read, rows per hook, rows per batch, windows per model pass)
SETUPS = {
    "cpu": (dict(d_model=512, d_head=64, n_heads=8, n_layers=6, n_ctx=128, d_vocab=4096), [1, 3, 5], 4096, 1024, 8),
    "cuda": (dict(d_model=768, d_head=64, n_heads=12, n_layers=12, n_ctx=128, d_vocab=50257), [2, 5, 8, 11], 65536,
             4096, 32),
    "quick": (dict(d_model=64, d_head=16, n_heads=4, n_layers=4, n_ctx=32, d_vocab=512), [0, 1, 3], 512, 128, 8),
}


def _setup():
    pytest.importorskip("transformer_lens")
    from saefast.data.models import tiny_model
    from saefast.data.source import ModelActivationSource
    from saefast.data.tokens import TokenWindows

    cfg, layers, rows, batch, per_pass = SETUPS[PROFILE]
    model = tiny_model({**cfg, "seed": 0}, device=DEVICE)
    hooks = [f"blocks.{i}.hook_resid_post" for i in layers]
    g = torch.Generator().manual_seed(0)
    docs = [{"input_ids": torch.randint(0, cfg["d_vocab"], (cfg["n_ctx"] * 4,), generator=g).tolist()}
            for _ in range(rows // cfg["n_ctx"] // 4 + 4)]

    def source(hook) -> ModelActivationSource:
        windows = TokenWindows(docs, None, cfg["n_ctx"], prepend_bos=False, tokens_column="input_ids")
        return ModelActivationSource(model, hook, windows, batch_size=batch, model_batch_size=per_pass,
                                     buffer_tokens=rows, seed=0, background=False)

    params = {"model": f"{cfg['n_layers']} layers, d_model {cfg['d_model']}", "hooks": ",".join(hooks),
              "rows_per_hook": rows, "batch": batch, "context": cfg["n_ctx"], "device": DEVICE}
    return source, hooks, rows // batch, params


@pytest.mark.parametrize("impl", ["separate", "saefast"])
def test_multihook_source(benchmark, record, impl):
    source, hooks, n_batches, params = _setup()

    def build() -> Callable[[], None]:
        def run() -> None:
            if impl == "saefast":  # one pass reads every hook
                src = source(hooks)
                for _ in range(n_batches):
                    next(src)
            else:  # one source (one pass) per hook
                for hook in hooks:
                    src = source(hook)
                    for _ in range(n_batches):
                        next(src)
        return run

    notes = ("ModelActivationSource over all hooks: one model pass per batch of windows, stopped after the "
             "deepest hook's block" if impl == "saefast" else
             "one ModelActivationSource per hook, each its own model pass (stopped after that hook's block)")
    run_contender(benchmark, record, group="multihook_source", impl=impl, params=params, build=build,
                  call=lambda run: run, notes=lambda _: notes, memory=True)
