"""Synthetic activations with a planted ground-truth dictionary (the embedded default of ``saefast train``).

Each row is a sparse positive combination of planted unit directions plus Gaussian noise::

    x = sum_i  m_i * [u_i < p_i] * D[i]  +  noise_std * eps,      D: [n_features, d_in], unit rows

Feature ``i`` fires independently with probability ``p_i ~ (i + 1) ** -zipf_exponent`` (heavy
tailed: a few features are frequent, most are rare), scaled so that on average ``mean_active``
features fire per row (probabilities are capped at 1). Magnitudes ``m_i`` are uniform in
[0.5, 1.5], so every active feature contributes a clearly positive amount. An SAE that learns the
data well has decoder rows close to the planted directions; :func:`saefast.evals.metrics.feature_recovery`
scores that.

The object follows the activation-source protocol of the trainer: an iterator of fp32
``[batch_size, d_in]`` tensors, ``.d_in``, and ``state_dict()/load_state_dict()`` (the RNG state
and the number of batches drawn) so that a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["SyntheticActivations"]

_STREAM_STRIDE = 1_000_003  # keeps the sample streams of different seeds / ranks apart
# Salts keep the dictionary and the samples off the random streams that other code seeds with
# the same small integers (an SAE initialised with torch.manual_seed(0) must not start at the answer).
_DICTIONARY_SALT = 0x5AE_D1C7
_SAMPLE_SALT = 0x5AE_5A3F


class SyntheticActivations:
    """Infinite (or ``n_batches``-long) stream of planted-dictionary activations.

    Args:
        d_in: width of each activation row.
        n_features: number of planted directions.
        batch_size: rows per batch.
        mean_active: expected number of active features per row.
        zipf_exponent: firing probability of feature i is proportional to (i + 1) ** -zipf_exponent.
        noise_std: std of the Gaussian noise added to every entry.
        dictionary_seed: seed of the planted dictionary (the same for every stream).
        seed: seed of the sample stream.
        stream: index of an independent stream with the same dictionary (e.g. a DDP rank).
        n_batches: stop after this many batches; None for an endless stream.
        device: where batches are placed (they are generated on the CPU, so results do not
            depend on the device).
    """

    def __init__(self, d_in: int, n_features: int, batch_size: int, *, mean_active: float = 4.0,
                 zipf_exponent: float = 0.6, noise_std: float = 0.01, dictionary_seed: int = 0, seed: int = 0,
                 stream: int = 0, n_batches: Optional[int] = None,
                 device: Union[str, torch.device] = "cpu") -> None:
        for name, value in (("d_in", d_in), ("n_features", n_features), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not 0 < mean_active <= n_features:
            raise ValueError(f"mean_active={mean_active} must be in (0, n_features={n_features}]")
        if zipf_exponent < 0:
            raise ValueError(f"zipf_exponent={zipf_exponent} must be >= 0")
        if noise_std < 0:
            raise ValueError(f"noise_std={noise_std} must be >= 0")
        if n_batches is not None and n_batches < 0:
            raise ValueError(f"n_batches={n_batches} must be >= 0 or None")
        self.d_in, self.n_features, self.batch_size = d_in, n_features, batch_size
        self.noise_std = noise_std
        self.n_batches = n_batches
        self.device = torch.device(device)

        g = torch.Generator().manual_seed(_DICTIONARY_SALT + dictionary_seed)
        directions = torch.randn(n_features, d_in, generator=g)
        self.true_features: Tensor = directions / directions.norm(dim=1, keepdim=True)
        weights = (torch.arange(n_features, dtype=torch.float64) + 1) ** -zipf_exponent
        self.feature_probs: Tensor = (weights * (mean_active / weights.sum())).clamp(max=1.0).float()

        self._gen = torch.Generator().manual_seed(_SAMPLE_SALT + seed * _STREAM_STRIDE + stream)
        self._drawn = 0

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        if self.n_batches is not None and self._drawn >= self.n_batches:
            raise StopIteration
        return self.sample(self.batch_size)[0].to(self.device)

    def sample(self, n_rows: int) -> Tuple[Tensor, Tensor]:
        """Draw ``n_rows`` rows: (x [n_rows, d_in] fp32, codes [n_rows, n_features] fp32)."""
        fires = torch.rand(n_rows, self.n_features, generator=self._gen) < self.feature_probs
        magnitudes = 0.5 + torch.rand(n_rows, self.n_features, generator=self._gen)
        codes = magnitudes * fires
        x = codes @ self.true_features
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn(n_rows, self.d_in, generator=self._gen)
        self._drawn += 1
        return x, codes

    def state_dict(self) -> Dict[str, Any]:
        return {"rng_state": self._gen.get_state(), "batches_drawn": self._drawn}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._gen.set_state(state["rng_state"])
        self._drawn = int(state["batches_drawn"])
