"""The ``backend`` fixture: each test that takes it runs on every backend of saefast.ops."""
import pytest

from saefast import torch_backend

# "torch-gather": the PyTorch backend's index_add_/gather backward that non-CPU devices use,
# forced on the CPU (which otherwise uses torch.sparse products).
BACKENDS = ["torch", "torch-gather", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SAEFAST_BACKEND", request.param.split("-")[0])
    if request.param == "torch-gather":
        monkeypatch.setattr(torch_backend, "SPARSE_BLAS_DEVICES", ())
    # Blocks of a few latents, so the CPU backward's latent blocks (and a partial last one) run
    # on these small shapes too.
    monkeypatch.setattr(torch_backend, "LATENT_BLOCK_ELEMENTS", 64)
    return request.param
