"""saefast.ops as a whole: dispatch between the backends, the backend contract, argument checks
that name the argument, and torch.autocast."""
import inspect

import pytest
import torch

import saefast
from saefast import backend as contract
from saefast import torch_backend
from kernel_utils import DEVICE, make_problem, problem


def test_bad_arguments_raise_clear_errors():
    x, W, bd, be = make_problem(4, 6, 10, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"k=0 must be between 1 and d_sae=10"):
        saefast.topk_encode(x, W, bd, 0)
    with pytest.raises(ValueError, match=r"k=11 must be between 1 and d_sae=10"):
        saefast.topk_encode(x, W, bd, 11)
    with pytest.raises(ValueError, match=r"x has 5 features per row but W_enc expects d_in=6"):
        saefast.topk_encode(x[:, :5].contiguous(), W, bd, 2)
    with pytest.raises(ValueError, match=r"x must have 2 dimension"):
        saefast.topk_encode(x[None], W, bd, 2)
    with pytest.raises(TypeError, match=r"x has dtype torch.bfloat16 but must match"):
        saefast.topk_encode(x.bfloat16(), W, bd, 2)
    with pytest.raises(TypeError, match=r"W_enc has dtype torch.int64"):
        saefast.topk_encode(x, W.long(), bd, 2)
    with pytest.raises(ValueError, match=r"W_enc must be contiguous"):
        saefast.topk_encode(x, W.t().contiguous().t(), bd, 2)
    with pytest.raises(ValueError, match=r"b_dec has shape \(5,\), expected \[6\]"):
        saefast.topk_encode(x, W, bd[:5], 2)
    with pytest.raises(ValueError, match=r"b_enc has shape"):
        saefast.topk_encode(x, W, bd, 2, b_enc=be[:3])
    with pytest.raises(ValueError, match=r"mode='dense' must be one of"):
        saefast.topk_encode(x, W, bd, 2, mode="dense")
    with pytest.raises(TypeError, match=r"k must be an int"):
        saefast.topk_encode(x, W, bd, 2.5)
    with pytest.raises(ValueError, match=r"dead_mask must be a bool tensor of shape \[10\]"):
        saefast.auxk_encode(x, W, bd, torch.ones(10), 2)
    with pytest.raises(ValueError, match=r"threshold has shape"):
        saefast.threshold_encode(x, W, bd, torch.ones(3))
    acts = saefast.topk_encode(x, W, bd, 2)
    with pytest.raises(ValueError, match=r"W_dec has 6 rows but the activations have d_sae=10"):
        saefast.sparse_decode(acts, W)
    with pytest.raises(TypeError, match=r"acts must be the SparseActs"):
        saefast.sparse_decode(acts.values, W.t().contiguous())
    with pytest.raises(ValueError, match=r"grad is None"):
        saefast.project_decoder_grad_(W.t().contiguous(), None)
    if not torch.cuda.is_available():
        meta = torch.empty(4, 6, device="meta")
        with pytest.raises(ValueError, match=r"x is on meta but the weights are on cpu"):
            saefast.topk_encode(meta, W, bd, 2)



def test_backend_choice(monkeypatch):
    from saefast.ops import backend_name
    monkeypatch.setenv("SAEFAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="SAEFAST_BACKEND='nonsense'"):
        backend_name(torch.device("cpu"))
    monkeypatch.setenv("SAEFAST_BACKEND", "torch")
    assert backend_name(torch.device("cuda")) == "torch"
    monkeypatch.delenv("SAEFAST_BACKEND")
    assert backend_name(torch.device("cpu")) == "torch"
    assert backend_name(torch.device("cuda")) == "triton"
    monkeypatch.setenv("SAEFAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="Set TRITON_INTERPRET=1"):
        backend_name(torch.device("cpu"))



def test_ops_run_in_the_autocast_dtype(backend):
    """Under torch.autocast with fp32 master weights the ops compute in bf16 and the weights get
    fp32 gradients equal to those of an explicit bf16 run."""
    B, d_in, d_sae, k = 19, 24, 70, 4
    x, W, bd, _ = problem(B, d_in, d_sae, torch.float32, seed=41)
    W_dec = W.t().contiguous()
    grads = []
    for use_autocast in (True, False):
        leaves = [t.clone().requires_grad_() for t in (W, bd, W_dec)]
        W_, bd_, Wd_ = leaves
        if use_autocast:
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                acts = saefast.topk_encode(x, W_, bd_, k)
                recon = saefast.sparse_decode(acts, Wd_, bd_)
        else:
            acts = saefast.topk_encode(x.bfloat16(), W_.bfloat16(), bd_.bfloat16(), k)
            recon = saefast.sparse_decode(acts, Wd_.bfloat16(), bd_.bfloat16())
        assert recon.dtype == torch.bfloat16
        (recon.float() - x).square().sum().backward()
        assert all(t.grad.dtype == torch.float32 for t in leaves)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)



def test_backends_implement_the_contract():
    """Both backends provide every function of saefast.backend with the contract's parameters,
    and neither reaches into the other's private names."""
    from saefast import triton_backend
    for module in (torch_backend, triton_backend):
        for name in contract.BACKEND_FUNCTIONS:
            fn = getattr(module, name, None)
            assert callable(fn), f"{module.__name__} lacks {name}"
            expected = list(inspect.signature(getattr(contract.Backend, name)).parameters)[1:]
            assert list(inspect.signature(fn).parameters) == expected, f"{module.__name__}.{name}"
    source = inspect.getsource(triton_backend)
    assert "torch_backend._" not in source, "the Triton backend calls a private function of the PyTorch backend"


def test_backward_inside_an_autocast_region(backend):
    """loss.backward() called inside torch.autocast (as many training loops do) gives the same
    gradients as outside: the backends never run under autocast."""
    B, d_in, d_sae, k = 13, 20, 60, 3
    x, W, bd, _ = problem(B, d_in, d_sae, torch.float32, seed=43)
    W_dec = W.t().contiguous()
    dead = (torch.arange(d_sae) % 4 == 0).to(DEVICE)
    grads = []
    for backward_inside in (True, False):
        leaves = [t.clone().requires_grad_() for t in (W, bd, W_dec)]
        W_, bd_, Wd_ = leaves
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            main, aux = saefast.ops.topk_encode_with_aux(x, W_, bd_, k, dead, 4)
            recon = saefast.sparse_decode(saefast.ops.stack_rows(main, aux), Wd_)
            loss = recon.float().square().sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
