"""Shared helpers of the training tests (tiny configs, in-memory activation sources)."""
from typing import Any, Dict, List

import torch

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

    def __init__(self, batches: List[torch.Tensor]) -> None:
        self.batches, self.pos = batches, 0
        self.d_in = batches[0].shape[1]

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
