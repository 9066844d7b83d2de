"""The training loop: loss falls, logs, accumulation, autocast, NaN handling, normalisation folding."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from saefast.config import SAEConfig
from saefast.io import load_sae
from saefast.sae import create_sae
from saefast.training import Trainer, TrainingDiverged
from saefast.training.build import build_sae

from train_helpers import ListSource, synthetic_run, tiny_config


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("architecture", ["batchtopk", "topk", "relu", "jumprelu", "matryoshka_batchtopk"])
def test_short_run_loss_falls_and_writes_a_loadable_sae(tmp_path, architecture):
    l1 = {"l1_coefficient": 1e-4} if architecture in ("relu", "jumprelu") else {}
    cfg = tiny_config(tmp_path, architecture=architecture, train_steps=60, tensorboard=architecture == "batchtopk",
                      checkpoint_every=30, eval_every=30, **l1)
    sae, source = synthetic_run(cfg)
    metrics = Trainer(sae, source, cfg).train()
    run = tmp_path / "run"
    rows = _rows(run / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 61))
    first, last = sum(r["mse_loss"] for r in train[:3]) / 3, sum(r["mse_loss"] for r in train[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    assert {"lr", "l0", "dead_fraction", "tokens_per_s", "grad_norm", "aux_loss"} <= train[-1].keys()
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [30, 60]
    assert json.loads((run / "eval.json").read_text()) == pytest.approx(metrics)
    assert 0 < metrics["explained_variance"] <= 1 and 0 <= metrics["dead_fraction"] <= 1
    assert "feature_recovery" in metrics
    loaded = load_sae(str(run / "sae"))
    for name, value in sae.state_dict().items():
        if name in loaded.state_dict():
            assert torch.equal(loaded.state_dict()[name], value), name
    assert len(list((run / "checkpoints").glob("step_*"))) == 2
    if cfg.tensorboard:
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_grad_accumulation_equals_the_full_batch_for_per_token_sparsity(tmp_path):
    torch.manual_seed(0)
    batches = [torch.randn(64, 16) for _ in range(5)]

    def run(name, batch_size, accum):
        cfg = tiny_config(tmp_path, run_name=name, architecture="topk", batch_size=batch_size,
                          grad_accum_steps=accum, train_steps=4, eval_batches=1)
        parts = [b.split(batch_size) for b in batches]
        source = ListSource([parts[0][0]] + [p for b in parts[1:] for p in b])
        sae = build_sae(cfg, 16, torch.device("cpu"))
        Trainer(sae, source, cfg).train()
        return sae

    full, accumulated = run("full", 64, 1), run("accum", 32, 2)
    held = torch.randn(8, 16)
    assert not torch.equal(full.W_dec, build_sae(tiny_config(tmp_path), 16, torch.device("cpu")).W_dec)
    for name, value in full.state_dict().items():
        torch.testing.assert_close(accumulated.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(full.reconstruct(held), accumulated.reconstruct(held), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_trains(tmp_path):
    cfg = tiny_config(tmp_path, autocast_bf16=True, train_steps=30)
    sae, source = synthetic_run(cfg)
    Trainer(sae, source, cfg).train()
    train = [r for r in _rows(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert train[-1]["mse_loss"] < 0.7 * train[0]["mse_loss"]
    assert sae.W_enc.dtype == torch.float32, "autocast must leave the weights in their dtype"


def test_nan_loss_stops_before_the_step_and_keeps_the_last_checkpoint(tmp_path):
    torch.manual_seed(0)
    batches = [torch.randn(64, 16) for _ in range(12)]
    batches[8] = batches[8] * 1e30  # finite input whose squared error overflows: loss = inf at step 8
    cfg = tiny_config(tmp_path, architecture="topk", checkpoint_every=5, eval_batches=1)
    sae = build_sae(cfg, 16, torch.device("cpu"))
    trainer = Trainer(sae, ListSource(batches), cfg)
    snapshots = []
    step = trainer.train_step

    def recording_step():
        snapshots.append(copy.deepcopy(sae.state_dict()))
        return step()
    trainer.train_step = recording_step
    with pytest.raises(TrainingDiverged, match=r"loss became inf at step 8.*step_00000005"):
        trainer.train()
    assert trainer.step == 7
    for name, value in snapshots[-1].items():  # the failing step changed nothing
        assert torch.equal(sae.state_dict()[name], value), name
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000005"
    weights = load_file(str(ckpt / "step_00000005" / "sae.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    assert not (tmp_path / "run" / "sae").exists(), "a diverged run must not write a final SAE"


@pytest.mark.parametrize("architecture", ["batchtopk", "topk", "relu", "jumprelu", "matryoshka_batchtopk"])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_folding_the_normalisation_gives_the_raw_scale_sae(tmp_path, architecture, apply_b_dec_to_input):
    torch.manual_seed(1)
    cfg = SAEConfig(d_in=12, d_sae=48, top_k=3, architecture=architecture, device="cpu",
                    apply_b_dec_to_input=apply_b_dec_to_input)
    sae = create_sae(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if hasattr(sae, "topk_threshold"):
        sae.update_threshold(torch.tensor(0.2))
    sae.eval()
    mean, scale = 3 * torch.randn(12), 0.25
    x = 4 * torch.randn(40, 12) + mean
    want = sae.reconstruct((x - mean) * scale) / scale + mean
    trainer = Trainer.__new__(Trainer)  # only the folding maths is exercised
    trainer.norm_mean, trainer.norm_scale = mean, scale
    trainer._fold(sae)
    torch.testing.assert_close(sae.reconstruct(x), want, rtol=1e-4, atol=1e-4)


def test_dataset_normalisation_is_estimated_and_folded(tmp_path):
    torch.manual_seed(2)
    cfg = tiny_config(tmp_path, normalize="dataset_center_scale", architecture="topk", train_steps=40, eval_batches=4)
    sae, source = synthetic_run(cfg)
    shift = 5 + torch.randn(16)
    batches = [100 * next(source) + shift for _ in range(44)]
    trainer = Trainer(sae, ListSource(batches), cfg)
    metrics = trainer.train()
    held = torch.cat(batches[:4])
    assert trainer.norm_mean is not None
    torch.testing.assert_close(trainer.norm_mean, held.mean(0), rtol=1e-4, atol=1e-3)
    centred = held - held.mean(0)
    assert trainer.norm_scale == pytest.approx((16 / centred.pow(2).sum(1).mean()).sqrt().item(), rel=1e-4)
    assert metrics["explained_variance"] > 0.5  # the saved SAE works on raw, shifted, scaled rows
    loaded = load_sae(str(tmp_path / "run" / "sae"))
    loaded.eval()
    torch.testing.assert_close(loaded.reconstruct(held), sae.eval().reconstruct(held))


def test_run_folder_and_resume_errors(tmp_path):
    cfg = tiny_config(tmp_path, train_steps=3)
    sae, source = synthetic_run(cfg)
    Trainer(sae, source, cfg).train()
    with pytest.raises(ValueError, match="already exists and is not empty"):
        Trainer(*synthetic_run(cfg), cfg)
    other = tiny_config(tmp_path, train_steps=3, lr=2e-2)
    with pytest.raises(ValueError, match=r"different config \(lr: run has 0.03, now 0.02\)"):
        Trainer(*synthetic_run(other), other, resume=True)
    missing = tiny_config(tmp_path, run_name="nothing")
    with pytest.raises(ValueError, match="does not exist"):
        Trainer(*synthetic_run(missing), missing, resume=True)
    with pytest.raises(ValueError, match="d_in=16 activations but the SAE has d_in=8"):
        Trainer(build_sae(tiny_config(tmp_path, run_name="x"), 8, torch.device("cpu")), source,
                tiny_config(tmp_path, run_name="x"))


def test_the_trainer_owns_its_run_folder(tmp_path, monkeypatch):
    """One check of the folder per run, config.json written once and read once on resume, and the
    training curves drawn by the trainer itself (no CLI involved)."""
    from saefast.cli import main
    from saefast.training import run_folder
    cfg = tiny_config(tmp_path, train_steps=6, checkpoint_every=3)
    sae, source = synthetic_run(cfg)
    trainer = Trainer(sae, source, cfg)
    trainer.train()
    run = tmp_path / "run"
    assert trainer.curves == run / "training_curves.png" and trainer.curves.is_file()
    # config.json holds the options, with d_sae (left to be derived) filled in
    assert cfg.d_sae is None and json.loads((run / "config.json").read_text()) == {**cfg.to_dict(), "d_sae": 64}

    prepares, config_reads = [], []
    real_prepare, real_read = run_folder.RunFolder.prepare.__func__, run_folder.read_json
    monkeypatch.setattr(run_folder.RunFolder, "prepare",
                        classmethod(lambda cls, *a, **k: prepares.append(1) or real_prepare(cls, *a, **k)))
    monkeypatch.setattr(run_folder, "read_json",
                        lambda path: config_reads.append(str(path)) or real_read(path))
    assert main(["train", "--resume", str(run), "--train-steps", "8"]) == 2  # a different option: refused
    assert len(prepares) == 1 and config_reads == [str(run / "config.json")]
    prepares.clear(), config_reads.clear()
    assert main(["train", "--resume", str(run)]) == 0
    assert len(prepares) == 1 and config_reads == [str(run / "config.json")]


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0], ids=["no-clipping", "clipping"])
def test_trainer_keeps_the_decoder_in_sae_adam_where_the_backend_has_the_fused_kernel(tmp_path, monkeypatch,
                                                                                      max_grad_norm):
    """On the Triton backend the trainer's optimizer is SAEAdam (renormalising W_dec in its pass,
    projecting there too when nothing is clipped); the run's weights equal the PyTorch backend's
    (Adam between the SAE's own projection and renormalisation) after a few steps."""
    from saefast.optim import SAEAdam
    from saefast.training import trainer as trainer_module
    calls = []
    for name in ("project_decoder_gradients", "normalize_decoder"):
        real = getattr(trainer_module.BaseSAE, name)
        monkeypatch.setattr(trainer_module.BaseSAE, name,
                            lambda self, _real=real, _name=name: (calls.append(_name), _real(self))[1])
    states = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("SAEFAST_BACKEND", backend)
        calls.clear()
        cfg = tiny_config(tmp_path, run_name=backend, architecture="topk", train_steps=4, max_grad_norm=max_grad_norm,
                          eval_batches=1)
        torch.manual_seed(0)
        sae = build_sae(cfg, 16, torch.device("cpu"))
        source = ListSource([torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) for i in range(6)])
        trainer = Trainer(sae, source, cfg)
        assert isinstance(trainer.optimizer, SAEAdam) == (backend == "triton"), backend
        trainer.train()
        fused = backend == "triton"
        assert calls.count("normalize_decoder") == (0 if fused else 4)
        assert calls.count("project_decoder_gradients") == (0 if fused and max_grad_norm == 0 else 4)
        states[backend] = {k: v.clone() for k, v in sae.state_dict().items()}
    assert not torch.equal(states["torch"]["W_dec"], build_sae(cfg, 16, torch.device("cpu")).W_dec)
    for name, value in states["torch"].items():
        torch.testing.assert_close(states["triton"][name], value, rtol=1e-4, atol=1e-5, msg=name)
