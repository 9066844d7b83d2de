"""Shared helpers of the training tests (tiny configs, in-memory activation sources, a tiny
transformer-lens model with a dataset written to disk, `saefast train` in a subprocess)."""
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import torch
from safetensors.torch import load_file

from saefast.config import variant_class
from saefast.training import TrainConfig
from saefast.training.build import build_inputs, build_sae

TINY = dict(d_in=16, synthetic_features=32, synthetic_active=2.0, batch_size=64, top_k=2, expansion_factor=4,
            train_steps=20, lr=3e-2, lr_warmup_steps=2, eval_batches=2, log_every=1, checkpoint_every=0,
            progress_bar=False, tensorboard=False, n_batches_to_dead=5)


def tiny_config(tmp_path, **overrides: Any) -> TrainConfig:
    values = {**TINY, "out_dir": str(tmp_path), "run_name": "run", **overrides}
    if not variant_class(values.get("architecture", "batchtopk")).needs_top_k and "top_k" not in overrides:
        del values["top_k"]  # an option the architecture does not use is refused
    return TrainConfig.from_dict(values)


def synthetic_run(cfg: TrainConfig):
    inputs = build_inputs(cfg, torch.device("cpu"))
    return build_sae(cfg, inputs.d_in, torch.device("cpu")), inputs.source


class ListSource:
    """Activation source over a fixed list of batches (follows the trainer's source protocol)."""

    def __init__(self, batches: List[Any]) -> None:
        from saefast.data.source import split_pair

        self.batches, self.pos = batches, 0
        x, target = split_pair(batches[0])
        self.d_in = x.shape[1]
        self.d_out = target.shape[1] if target is not None else None

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.pos >= len(self.batches):
            raise StopIteration
        self.pos += 1
        return self.batches[self.pos - 1]

    def state_dict(self) -> Dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.pos = state["pos"]


# ---------------------------------------------------------------------------------------------
# model runs, with a tiny random transformer-lens model and a dataset written by the test
# ---------------------------------------------------------------------------------------------
WORDS = "the cat sat on a mat while dog ran far away from big red ball and then slept".split()


def tiny_model_with_tokenizer():
    """A random 3-layer transformer-lens model (d_model 16) carrying a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from saefast.data.models import tiny_model
    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>",
                                        unk_token="<unk>")
    model = tiny_model(dict(d_model=16, d_head=4, n_heads=4, n_layers=3, n_ctx=32, d_vocab=len(vocab), seed=0))
    model.tokenizer = tokenizer  # what load_model's hub models carry
    return model


def model_run_files(tmp):
    """(tmp, docs.jsonl, model): 40 random documents (and an empty.jsonl) in ``tmp``, and the model."""
    pytest.importorskip("transformer_lens")  # absent on the lent GPU machine
    pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n),), generator=g).tolist())
            for n in torch.randint(3, 30, (40,), generator=g)]
    data = tmp / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp / "empty.jsonl").write_text("")
    return tmp, data, tiny_model_with_tokenizer()


def train_in_subprocess(out_dir, *args: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """``saefast train --out-dir out_dir *args`` in a process of its own (which a test may kill),
    its output captured."""
    cmd = [sys.executable, "-m", "saefast.cli", "train", "--out-dir", str(out_dir), *args]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def saved_weights(run: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of the SAE a run saved, keyed ``<file>:<name>``."""
    out = {}
    for f in (Path(run) / "sae").glob("*.safetensors"):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out
