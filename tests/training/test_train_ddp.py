"""Data parallel on CPU: 2 gloo processes against one process.

Each process computes its loss on its own half of every global batch and DDP averages the
gradients, so 2 processes x B rows equal one process accumulating 2 micro-batches of B rows
(every variant; BatchTopK and Matryoshka BatchTopK select per process), and for per-token
sparsity (TopK, JumpReLU) also one process on the concatenated 2B rows. Dead-latent counters and
BatchTopK's threshold are all-reduced, so the SAE buffers agree too; JumpReLU's L0-target price is
a parameter, averaged like every gradient. A skip transcoder trains on (input, target) pairs the
same way.
"""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saefast.data.source import ActivationPair
from saefast.training import Trainer
from saefast.training.build import build_sae

from train_helpers import ListSource, tiny_config

B, D_IN, STEPS = 32, 16, 4
# run name -> architecture and options; the JumpReLU L0 target's price is a parameter like any other
ARCHS = {"topk": {"architecture": "topk"}, "batchtopk": {"architecture": "batchtopk"},
         "matryoshka": {"architecture": "matryoshka_batchtopk", "matryoshka_prefixes": [8, 24, 64]},
         "jumprelu": {"architecture": "jumprelu", "jumprelu_target_l0": 3.0, "jumprelu_bandwidth": 0.1,
                      "jumprelu_pre_act_coefficient": 1e-3},
         "transcoder": {"architecture": "topk", "d_out": 8, "skip_connection": True}}


def _global_batches(arch):
    g = torch.Generator().manual_seed(0)
    # batch 0 is held out; the planted-ish data has a few rare directions so latents die and revive
    batches = [torch.randn(2 * B, D_IN, generator=g) * torch.linspace(0.2, 2.0, D_IN) for _ in range(STEPS + 1)]
    if "d_out" in ARCHS[arch]:  # a transcoder's target: a fixed nonlinear map of the input
        return [ActivationPair(x, torch.tanh(x[:, :8] - x[:, 8:])) for x in batches]
    return batches


def _rows(batch, lo, hi):
    return ActivationPair(batch.x[lo:hi], batch.target[lo:hi]) if isinstance(batch, ActivationPair) else batch[lo:hi]


def _split(batch, size):
    n = batch.x.shape[0] if isinstance(batch, ActivationPair) else batch.shape[0]
    return [_rows(batch, lo, lo + size) for lo in range(0, n, size)]


def _config(tmp_path, name, arch, batch_size, accum=1):
    return tiny_config(tmp_path, run_name=name, batch_size=batch_size, grad_accum_steps=accum, train_steps=STEPS,
                       eval_batches=1, n_batches_to_dead=2, checkpoint_every=2, **ARCHS[arch])


def _result(sae):
    return {"state": {k: v.clone() for k, v in sae.state_dict().items()},
            "grads": {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}}


def _worker(rank, world, port, tmp_path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for arch in ARCHS:
            cfg = _config(tmp_path, f"ddp-{arch}", arch, B)
            shards = [_rows(b, rank * B, (rank + 1) * B) for b in _global_batches(arch)]
            sae = build_sae(cfg, D_IN, torch.device("cpu"), d_out=cfg.d_out)
            trainer = Trainer(sae, ListSource(shards), cfg)
            trainer.train()
            results[arch] = _result(sae)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single(tmp_path, arch, batch_size, accum):
    cfg = _config(tmp_path, f"single-{arch}-{accum}", arch, batch_size, accum)
    batches = [part for b in _global_batches(arch) for part in _split(b, batch_size)]
    if accum == 2:
        batches = batches[:1] + batches[2:]  # hold out one micro-batch (rank 0's share) like DDP rank 0
    sae = build_sae(cfg, D_IN, torch.device("cpu"), d_out=cfg.d_out)
    Trainer(sae, ListSource(batches), cfg).train()
    return _result(sae)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_close(a, b, what):
    assert a.keys() == b.keys(), what
    for name in a:
        torch.testing.assert_close(a[name].float(), b[name].float(), rtol=1e-4, atol=1e-6, msg=f"{what}: {name}")


def test_two_gloo_processes_match_one_process(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), tmp_path, str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for arch in ARCHS:
        for key in ("state", "grads"):
            _assert_close(ranks[0][arch][key], ranks[1][arch][key], f"{arch} ranks disagree on {key}")
        accumulated = _single(tmp_path, arch, B, 2)
        _assert_close(ranks[0][arch]["state"], accumulated["state"], f"{arch} vs 1 process accumulating 2 x {B}")
        _assert_close(ranks[0][arch]["grads"], accumulated["grads"], f"{arch} grads vs accumulation")
    for arch in ("topk", "jumprelu", "transcoder"):  # per-token sparsity: also one process on the concatenated batch
        full = _single(tmp_path, arch, 2 * B, 1)
        _assert_close(ranks[0][arch]["state"], full["state"], f"{arch} vs 1 process on the concatenated batch")
        _assert_close(ranks[0][arch]["grads"], full["grads"], f"{arch} grads vs the concatenated batch")
    assert (ranks[0]["batchtopk"]["state"]["num_batches_not_active"] > 0).any()
    assert (tmp_path / "ddp-topk" / "sae" / "cfg.json").is_file()
