"""saefast train with several hooks from one model pass, transcoders (input hook -> target hook) and
crosscoders, on a tiny random model; the synthetic defaults of transcoders and crosscoders; folding
a transcoder's normalisation; resuming a multi-hook run after a crash."""
import json

import pytest
import torch
from safetensors.torch import load_file

from saefast import SAEConfig, create_sae
from saefast.cli import main
from saefast.io import load_sae
from saefast.training.trainer import Trainer
from train_helpers import model_run_files

FAST = ["--no-progress-bar", "--no-tensorboard"]
MODEL_ARGS = ["--model", "tiny", "--context-size", "16", "--batch-size", "32", "--model-batch-size", "4",
              "--buffer-tokens", "128", "--eval-batches", "2", "--eval-ce-batches", "1", "--top-k", "4",
              "--expansion-factor", "2", "--lr", "0.01", "--train-steps", "6", "--checkpoint-every", "3", *FAST]
A, B = "blocks.0.hook_resid_post", "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    return model_run_files(tmp_path_factory.mktemp("multihook"))


@pytest.fixture
def counted(model_run, monkeypatch):
    """The model, loaded by every run, with a record of the hooks of each of its cached passes."""
    tmp, data, model = model_run
    monkeypatch.setattr("saefast.data.models.load_model", lambda name, device="cpu", dtype=None: model)
    passes = []
    original = type(model).run_with_cache

    def run_with_cache(self, *args, **kwargs):
        passes.append(list(kwargs.get("names_filter") or []))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "run_with_cache", run_with_cache)
    return tmp, data, passes


def _weights(folder):
    return load_file(str(folder / "sae_weights.safetensors"))


def test_several_hooks_train_one_sae_each_from_one_model_pass(counted, capsys):
    tmp, data, passes = counted
    assert main(["train", "--dataset", str(data), "--out-dir", str(tmp), "--run-name", "multi", "--hook", A,
                 "--hook", B, *MODEL_ARGS]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "trained 2 SAEs from one model pass" in out
    run = tmp / "multi"
    shared = [p for p in passes if p == [A, B]]
    assert shared and not [p for p in passes if p in ([A], [B]) and len(p) == 1 and passes.index(p) > 3], \
        "training reads both hooks in the same passes"
    parent = json.loads((run / "config.json").read_text())
    assert parent["hooks"] == [A, B] and parent["hook"] is None
    summary = json.loads((run / "eval.json").read_text())
    assert set(summary) == {A, B}
    for hook in (A, B):
        member = run / hook
        cfg = json.loads((member / "config.json").read_text())
        assert cfg["hook"] == hook and cfg["hooks"] == []
        assert (member / "metrics.jsonl").is_file() and (member / "checkpoints" / "latest").is_file()
        sae = load_sae(str(member / "sae"))
        assert sae.config.hook_spec == hook
        assert summary[hook]["ce_loss_recovered"] == json.loads((member / "eval.json").read_text())["ce_loss_recovered"]

    # each member trained exactly as a run on its hook alone would have (same batches, own Adam)
    passes.clear()
    assert main(["train", "--dataset", str(data), "--out-dir", str(tmp), "--run-name", "alone", "--hook", B,
                 *MODEL_ARGS]) == 0
    alone, member = _weights(tmp / "alone" / "sae"), _weights(run / B / "sae")
    assert alone.keys() == member.keys()
    for name in alone:
        assert torch.equal(alone[name], member[name]), name
    assert json.loads((tmp / "alone" / "eval.json").read_text()) == pytest.approx(summary[B])

    assert main(["eval", str(run / A)]) == 0  # a member folder is a run folder of its own
    assert main(["eval", str(run)]) == 0
    evaluated = json.loads((run / "eval.json").read_text())
    assert set(evaluated) == {A, B}
    assert {k: evaluated[B][k] for k in evaluated[B]} == pytest.approx({k: summary[B][k] for k in evaluated[B]},
                                                                       rel=1e-5)


def test_killed_multi_hook_run_resumes_from_the_step_every_member_holds(counted, monkeypatch, capsys):
    tmp, data, _ = counted
    argv = ["train", "--dataset", str(data), "--out-dir", str(tmp), "--hook", A, "--hook", B, *MODEL_ARGS,
            "--train-steps", "7", "--checkpoint-every", "2", "--keep-checkpoints", "1", "--log-every", "1"]
    assert main([*argv, "--run-name", "full"]) == 0, capsys.readouterr().err

    class Crash(Exception):
        pass

    advance = Trainer.advance

    def crashing(self):
        # B's trainer dies before its step 5, after A's trainer took step 5 and A and B saved step 4
        if self.cfg.hook == B and self.step == 4:
            raise Crash()
        advance(self)

    monkeypatch.setattr(Trainer, "advance", crashing)
    with pytest.raises(Crash):
        main([*argv, "--run-name", "crashed"])
    monkeypatch.setattr(Trainer, "advance", advance)
    run = tmp / "crashed"
    assert (run / A / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (run / B / "checkpoints" / "latest").read_text().strip() == "step_00000004"

    def crash_before_b_saves(self):
        if self.cfg.hook == B and self.step == 5:
            raise Crash()  # A has saved step 6 (and kept step 4, unpruned); B holds step 4 only
        advance(self)

    monkeypatch.setattr(Trainer, "advance", crash_before_b_saves)
    with pytest.raises(Crash):
        main(["train", "--resume", str(run)])
    monkeypatch.setattr(Trainer, "advance", advance)
    steps = {h: sorted(p.name for p in (run / h / "checkpoints").iterdir() if p.name.startswith("step_"))
             for h in (A, B)}
    assert steps == {A: ["step_00000004", "step_00000006"], B: ["step_00000004"]}

    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err
    for hook in (A, B):
        want, got = _weights(tmp / "full" / hook / "sae"), _weights(run / hook / "sae")
        for name in want:
            assert torch.equal(want[name], got[name]), f"{hook} {name} differs after resume"
        logged = [json.loads(r)["step"] for r in (run / hook / "metrics.jsonl").read_text().splitlines()
                  if '"train"' in r]
        assert logged == list(range(1, 8))
        assert len(list((run / hook / "checkpoints").glob("step_*"))) == 1  # pruned to keep_checkpoints


def test_transcoder_run_reads_input_and_target_in_one_pass_and_splices_at_the_target(counted, capsys):
    tmp, data, passes = counted
    src, dst = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    assert main(["train", "--dataset", str(data), "--out-dir", str(tmp), "--run-name", "tc", "--hook", src,
                 "--target-hook", dst, "--skip-connection", "--normalize", "dataset_center_scale",
                 *MODEL_ARGS]) == 0, capsys.readouterr().err
    assert [src, dst] in passes
    sae = load_sae(str(tmp / "tc" / "sae"))
    assert sae.config.is_transcoder and sae.config.skip_connection
    assert (sae.config.hook_spec, sae.config.hook_spec_out, sae.d_out) == (src, dst, 16)
    metrics = json.loads((tmp / "tc" / "eval.json").read_text())
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablation", "ce_loss_recovered", "kl", "explained_variance"):
        assert metrics[key] == metrics[key], key
    assert main(["eval", str(tmp / "tc")]) == 0
    evaluated = json.loads((tmp / "tc" / "eval.json").read_text())
    assert evaluated["explained_variance"] == pytest.approx(metrics["explained_variance"], rel=1e-5)
    assert evaluated["ce_spliced"] == pytest.approx(metrics["ce_spliced"], rel=1e-5)


def test_crosscoder_run_over_every_residual_hook(counted, capsys):
    tmp, data, passes = counted
    no_top_k = [a for i, a in enumerate(MODEL_ARGS) if "--top-k" not in MODEL_ARGS[max(i - 1, 0):i + 1]]
    assert main(["train", "--dataset", str(data), "--out-dir", str(tmp), "--run-name", "cc", "--architecture",
                 "crosscoder", "--hooks", "all-resid", "--normalize", "dataset_scale", *no_top_k]) == 0, \
        capsys.readouterr().err
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert hooks in passes
    sae = load_sae(str(tmp / "cc" / "sae"))
    assert sae.architecture == "crosscoder" and sae.config.crosscoder_hooks == hooks and sae.d_in == 48
    assert sae.d_sae == 2 * 16  # expansion factor times one layer's width
    metrics = json.loads((tmp / "cc" / "eval.json").read_text())
    assert metrics["kl"] == metrics["kl"] and metrics["ce_spliced"] == metrics["ce_spliced"]


def test_cache_of_several_hooks_then_one_sae_per_hook(counted, capsys):
    tmp, data, _ = counted
    cache = tmp / "acts"
    assert main(["cache", "--model", "tiny", "--hook", A, "--hook", B, "--dataset", str(data), "--context-size",
                 "16", "--model-batch-size", "4", "--buffer-tokens", "128", "--batch-size", "32", "--out",
                 str(cache), "--n-tokens", "320", "--shard-tokens", "100"]) == 0, capsys.readouterr().err
    assert f"activations of {A}, {B}" in capsys.readouterr().out
    argv = ["train", "--cache-dir", str(cache), "--out-dir", str(tmp), "--run-name", "from-cache", "--hook", A,
            "--hook", B, "--batch-size", "32", "--eval-batches", "1", "--top-k", "4", "--train-steps", "4", *FAST]
    assert main(argv) == 0, capsys.readouterr().err
    for hook in (A, B):
        assert load_sae(str(tmp / "from-cache" / hook / "sae")).config.hook_spec == hook
    assert main(["train", "--cache-dir", str(cache), "--out-dir", str(tmp), "--run-name", "x", "--hook",
                 "blocks.1.hook_resid_post", "--top-k", "4", *FAST]) == 2
    assert "holds hooks" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--hook", A, "--hooks", B], "not both"),
    (["--hook", A, "--hook", B, "--target-hook", B], "one target per input hook"),
    (["--target-hook", B], "missing: hook"),
    (["--hook", A, "--skip-connection"], "skip_connection=True needs a transcoder"),
    (["--hook", A, "--d-out", "16"], "take from target_hook"),
    (["--architecture", "crosscoder", "--hook", A, "--hook", B, "--target-hook", B], "do not apply"),
    (["--hook", A, "--hook", A], "names a hook twice"),
])
def test_bad_hook_options_fail_before_work(counted, capsys, argv, message):
    tmp, data, _ = counted
    assert main(["train", "--dataset", str(data), "--out-dir", str(tmp), "--run-name", "bad", *MODEL_ARGS,
                 *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp / "bad").exists()


def test_synthetic_transcoder_and_crosscoder_defaults(tmp_path, capsys):
    assert main(["train", "--out-dir", str(tmp_path), "--run-name", "tc", "--d-out", "24", "--d-in", "32",
                 "--synthetic-features", "48", "--synthetic-active", "2", "--train-steps", "300",
                 "--lr-decay-floor", "1", "--batch-size", "256", *FAST]) == 0
    metrics = json.loads((tmp_path / "tc" / "eval.json").read_text())
    assert metrics["feature_recovery"] > 0.8 and metrics["explained_variance"] > 0.5
    assert load_sae(str(tmp_path / "tc" / "sae")).d_out == 24
    assert main(["train", "--out-dir", str(tmp_path), "--run-name", "cc", "--architecture", "crosscoder",
                 "--d-in", "48", "--synthetic-layers", "3", "--synthetic-features", "32", "--train-steps", "300",
                 "--lr", "0.01", "--lr-decay-floor", "1", "--batch-size", "256", *FAST]) == 0
    metrics = json.loads((tmp_path / "cc" / "eval.json").read_text())
    assert metrics["feature_recovery"] > 0.8
    sae = load_sae(str(tmp_path / "cc" / "sae"))
    assert sae.n_layers == 3 and sae.d_in == 48 and sae.d_sae == 16 * 4
    assert main(["train", "--out-dir", str(tmp_path), "--run-name", "x", "--hook", A]) == 2
    assert "only acts on a model run or a cache run" in capsys.readouterr().err


def test_folding_a_transcoders_normalisation_gives_the_raw_scale_transcoder():
    torch.manual_seed(1)
    sae = create_sae(SAEConfig(d_in=12, d_out=7, d_sae=40, top_k=3, architecture="topk", skip_connection=True,
                               device="cpu"))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sae.eval()
    mean_in, scale_in, mean_out, scale_out = 3 * torch.randn(12), 0.25, torch.randn(7), 4.0
    x = 4 * torch.randn(40, 12) + mean_in
    want = sae.reconstruct((x - mean_in) * scale_in) / scale_out + mean_out
    trainer = Trainer.__new__(Trainer)  # only the folding maths is exercised
    trainer.norm_mean, trainer.norm_scale = mean_in, scale_in
    trainer.target_mean, trainer.target_scale = mean_out, scale_out
    trainer._fold(sae)
    torch.testing.assert_close(sae.reconstruct(x), want, rtol=1e-4, atol=1e-4)
