"""Synthetic activations with a planted ground-truth dictionary (the embedded default of ``saefast train``).

Each row is a sparse positive combination of planted unit directions plus Gaussian noise::

    x = sum_i  m_i * [u_i < p_i] * D[i]  +  noise_std * eps,      D: [n_features, d_in], unit rows

Feature ``i`` fires independently with probability ``p_i ~ (i + 1) ** -zipf_exponent`` (heavy
tailed: a few features are frequent, most are rare), scaled so that on average ``mean_active``
features fire per row (probabilities are capped at 1). Magnitudes ``m_i`` are uniform in
[0.5, 1.5], so every active feature contributes a clearly positive amount. An SAE that learns the
data well has decoder rows close to the planted directions; :func:`saefast.evals.metrics.feature_recovery`
scores that.

Two more planted tasks share the same codes:

* **Transcoder pairs** (``d_out`` given): each row also gets a target in another space,
  ``y = sum_i m_i [u_i < p_i] * D_out[i] + linear_scale * x @ A + noise_std * eps'``, with its own
  planted unit directions ``D_out [n_features, d_out]`` and a fixed random linear map ``A [d_in,
  d_out]`` (what a skip connection can learn); batches are
  :class:`~saefast.data.source.ActivationPair` ``(x, target)``, and ``true_features`` is ``D_out``
  (what a transcoder's decoder should recover).
* **Features spanning layers** (``n_layers > 1``): each feature lives in a contiguous span of the
  ``n_layers`` layers (span length uniform in 1..n_layers), with a unit direction per layer and a
  weight in [0.5, 1.5] inside its span (0 outside); a row is the layers' activations
  concatenated, ``[n_layers * d_in]`` (a crosscoder's input), and ``true_features`` holds each
  feature's concatenated per-layer direction, normalised; ``layer_spans`` says where each lives.

The object follows the activation-source protocol of the trainer: an iterator of fp32
``[batch_size, d_in]`` tensors (or pairs), ``.d_in`` (``.d_out``, ``.n_layers``), and
``state_dict()/load_state_dict()`` (the RNG state and the number of batches drawn) so that a
resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

from .source import ActivationPair

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
        d_out: width of a transcoder target; batches become ``ActivationPair(x, target)``.
        linear_scale: weight of the linear part ``x @ A`` of the target (transcoder pairs only).
        n_layers: layers the features span; rows are ``[n_layers * d_in]`` (not with d_out).
    """

    def __init__(self, d_in: int, n_features: int, batch_size: int, *, mean_active: float = 4.0,
                 zipf_exponent: float = 0.6, noise_std: float = 0.01, dictionary_seed: int = 0, seed: int = 0,
                 stream: int = 0, n_batches: Optional[int] = None,
                 device: Union[str, torch.device] = "cpu", d_out: Optional[int] = None,
                 linear_scale: float = 0.0, n_layers: int = 1) -> None:
        for name, value in (("d_in", d_in), ("n_features", n_features), ("batch_size", batch_size),
                            ("n_layers", n_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if d_out is not None and (isinstance(d_out, bool) or not isinstance(d_out, int) or d_out < 1):
            raise ValueError(f"d_out={d_out!r} must be a positive integer or None")
        if d_out is not None and n_layers > 1:
            raise ValueError("give d_out (transcoder pairs) or n_layers > 1 (features spanning layers), not both")
        if linear_scale and d_out is None:
            raise ValueError(f"linear_scale={linear_scale} is the linear part of a transcoder target: set d_out too")
        if not 0 < mean_active <= n_features:
            raise ValueError(f"mean_active={mean_active} must be in (0, n_features={n_features}]")
        if zipf_exponent < 0:
            raise ValueError(f"zipf_exponent={zipf_exponent} must be >= 0")
        if noise_std < 0:
            raise ValueError(f"noise_std={noise_std} must be >= 0")
        if n_batches is not None and n_batches < 0:
            raise ValueError(f"n_batches={n_batches} must be >= 0 or None")
        self.n_features, self.batch_size = n_features, batch_size
        self.d_out, self.n_layers, self.linear_scale = d_out, n_layers, float(linear_scale)
        self.d_in = d_in * n_layers  # the width of a row (the layers concatenated)
        self.noise_std = noise_std
        self.n_batches = n_batches
        self.device = torch.device(device)

        g = torch.Generator().manual_seed(_DICTIONARY_SALT + dictionary_seed)
        directions = torch.randn(n_features, d_in, generator=g)
        self.true_features: Tensor = directions / directions.norm(dim=1, keepdim=True)
        weights = (torch.arange(n_features, dtype=torch.float64) + 1) ** -zipf_exponent
        self.feature_probs: Tensor = (weights * (mean_active / weights.sum())).clamp(max=1.0).float()
        self.true_input_features: Tensor = self.true_features
        self._mixing: Tensor = self.true_features  # codes [n, n_features] @ this -> rows
        if d_out is not None:
            out_dirs = torch.randn(n_features, d_out, generator=g)
            self.true_features = out_dirs / out_dirs.norm(dim=1, keepdim=True)
            self.linear_map: Tensor = torch.randn(d_in, d_out, generator=g) / d_in ** 0.5
        if n_layers > 1:
            self._plant_layers(g, d_in)
        self._gen = torch.Generator().manual_seed(_SAMPLE_SALT + seed * _STREAM_STRIDE + stream)
        self._drawn = 0

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def _plant_layers(self, g: torch.Generator, d_layer: int) -> None:
        """Per-layer directions and contiguous layer spans of every feature (layer 0's directions
        are the single-layer dictionary)."""
        L, n = self.n_layers, self.n_features
        dirs = torch.cat([self.true_features[:, None], torch.randn(n, L - 1, d_layer, generator=g)], dim=1)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        length = torch.randint(1, L + 1, (n,), generator=g)
        start = (torch.rand(n, generator=g) * (L - length + 1)).long()
        layer = torch.arange(L)
        self.layer_spans: Tensor = (layer >= start[:, None]) & (layer < (start + length)[:, None])
        weight = (0.5 + torch.rand(n, L, generator=g)) * self.layer_spans
        self._mixing = (dirs * weight[..., None]).flatten(1)
        self.true_features = self._mixing / self._mixing.norm(dim=1, keepdim=True)
        self.true_input_features = self.true_features

    def __next__(self) -> Union[Tensor, ActivationPair]:
        if self.n_batches is not None and self._drawn >= self.n_batches:
            raise StopIteration
        batch = self.sample(self.batch_size)[0]
        if isinstance(batch, ActivationPair):
            return ActivationPair(batch.x.to(self.device), batch.target.to(self.device))
        return batch.to(self.device)

    def sample(self, n_rows: int) -> Tuple[Union[Tensor, ActivationPair], Tensor]:
        """Draw ``n_rows`` rows: (x [n_rows, d_in] fp32, or ``ActivationPair(x, target [n_rows,
        d_out])`` with ``d_out``; codes [n_rows, n_features] fp32)."""
        fires = torch.rand(n_rows, self.n_features, generator=self._gen) < self.feature_probs
        magnitudes = 0.5 + torch.rand(n_rows, self.n_features, generator=self._gen)
        codes = magnitudes * fires
        x = codes @ self._mixing
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn(n_rows, self.d_in, generator=self._gen)
        self._drawn += 1
        if self.d_out is None:
            return x, codes
        y = codes @ self.true_features + self.linear_scale * (x @ self.linear_map)
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(n_rows, self.d_out, generator=self._gen)
        return ActivationPair(x, y), codes

    def state_dict(self) -> Dict[str, Any]:
        return {"rng_state": self._gen.get_state(), "batches_drawn": self._drawn}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._gen.set_state(state["rng_state"])
        self._drawn = int(state["batches_drawn"])
