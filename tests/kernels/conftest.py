"""The ``backend`` fixture: each test that takes it runs on every backend of saefast.ops."""
import pytest

from saefast import cpu_kernels, torch_backend

# "torch": the PyTorch backend as it runs (on the CPU: with its C++ kernels where they build).
# "torch-pytorch": the same without the C++ kernels (torch.sparse products on the CPU): the
# fallback where no compiler is found.
# "torch-gather": the PyTorch backend's index_add_/gather backward that non-CPU devices use,
# forced on the CPU.
BACKENDS = ["torch", "torch-pytorch", "torch-gather", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SAEFAST_BACKEND", request.param.split("-")[0])
    if request.param in ("torch-pytorch", "torch-gather"):
        monkeypatch.setenv(cpu_kernels.ENV, "0")
    if request.param == "torch-gather":
        monkeypatch.setattr(torch_backend, "SPARSE_BLAS_DEVICES", ())
    # Blocks of a few latents, so the CPU backward's latent blocks (and a partial last one) run
    # on these small shapes too; a few latent columns per encode block, so the C++ encode runs
    # several blocks (and a partial last one) as well.
    monkeypatch.setattr(torch_backend, "LATENT_BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(torch_backend, "ENCODE_BLOCK_ELEMENTS", 64)
    # The C++ decode that walks entries latent by latent, on shapes far too small to pick it.
    monkeypatch.setattr(torch_backend, "DECODE_BY_LATENT_MIN_ENTRIES", 0)
    return request.param
