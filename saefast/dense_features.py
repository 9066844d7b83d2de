"""Dense features that are built only when something reads them.

The classic SAE API returns ``(x_recon, features)`` with ``features`` the dense ``[..., d_sae]``
activations. Most loops only pass them to ``update_inactive_features``, which needs the sparse
codes alone, so :class:`DenseFeatures` stands in for the dense tensor and builds it on first use.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from .ops import SparseActs

__all__ = ["DenseFeatures"]

# Queries answered from the shape, dtype and device alone (property getters and methods).
_METADATA = {
    torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__, torch.Tensor.ndim.__get__,
    torch.Tensor.layout.__get__, torch.Tensor.is_cuda.__get__, torch.Tensor.is_cpu.__get__,
    torch.Tensor.is_sparse.__get__, torch.Tensor.is_quantized.__get__, torch.Tensor.is_meta.__get__,
    torch.Tensor.dim, torch.Tensor.ndimension, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.nelement,
    torch.Tensor.element_size, torch.Tensor.is_floating_point, torch.Tensor.is_complex, torch.Tensor.get_device,
    torch.Tensor.__len__,
}
_REQUIRES_GRAD = torch.Tensor.requires_grad.__get__


class DenseFeatures(Tensor):
    """The dense features ``acts.to_dense().reshape(*lead, d_sae)`` of sparse codes, built on first use.

    It behaves as that dense tensor for every torch function, method and operator (indexing,
    arithmetic, ``torch.cat``, ``.detach()``, ``.cpu()``, printing, ``backward`` ...): the first
    such use builds the tensor, differentiable in ``acts.values`` (with gradients enabled, whatever
    the caller's context, as a forward pass would have built it), keeps it, and every use runs on
    it and returns plain tensors. Asking for ``shape``, ``size()``, ``dim()``, ``numel()``,
    ``len()``, ``dtype``, ``device`` or ``requires_grad`` builds nothing, and
    ``BaseSAE.update_inactive_features`` reads the sparse codes, so a loop that only does those
    never holds a ``[tokens, d_sae]`` tensor.

    acts: the codes of ``prod(lead)`` rows; lead: the leading shape (``x.shape[:-1]``).
    """

    _acts: SparseActs
    _dense: Optional[Tensor]

    @staticmethod
    def __new__(cls, acts: SparseActs, lead: Tuple[int, ...]) -> "DenseFeatures":
        # A one-element tensor seen through a zero-stride view: the right shape, dtype and device
        # for the queries above, and no memory of the dense size.
        values = acts.values
        stand_in = torch.zeros((), dtype=values.dtype, device=values.device).expand(*lead, acts.d_sae)
        obj = Tensor._make_subclass(cls, stand_in, False)
        obj._acts = acts
        obj._dense = None
        return obj

    def __init__(self, acts: SparseActs, lead: Tuple[int, ...]) -> None:
        super().__init__()

    @property
    def acts(self) -> SparseActs:
        """The sparse codes these features are the dense form of."""
        return self._acts

    @property
    def is_materialized(self) -> bool:
        """Whether the dense tensor has been built."""
        return self._dense is not None

    def materialize(self) -> Tensor:
        """The dense tensor (a plain ``torch.Tensor``), built on the first call."""
        if self._dense is None:
            shape = tuple(Tensor.size(self))
            with torch.inference_mode(False), torch.enable_grad():
                self._dense = self._acts.to_dense().reshape(shape)
        return self._dense

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func == _REQUIRES_GRAD:
            self = args[0]
            return self._dense.requires_grad if self._dense is not None else self._acts.values.requires_grad

        def dense(a):
            return a.materialize() if isinstance(a, DenseFeatures) else a

        return func(*tree_map(dense, args), **tree_map(dense, kwargs))
