"""The saefast command: embedded synthetic default, eval, config files, model runs, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from saefast.cli import main
from saefast.evals.metrics import feature_recovery
from saefast.io import load_sae
from train_helpers import model_run_files

FAST = ["--no-progress-bar", "--no-tensorboard", "--checkpoint-every", "0"]


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--lr-warmup-steps", "Linear LR warm-up", "--resume RUN_DIR", "--config FILE", "--model",
                 "embedded synthetic default", "--e2e-kl-weight", "--autocast-bf16"):
        assert text in out, text


def test_embedded_default_trains_reports_recovery_and_evals(tmp_path, capsys):
    argv = ["train", "--out-dir", str(tmp_path), "--run-name", "syn", "--train-steps", "150",
            "--batch-size", "256", *FAST]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "planted-feature recovery" in out and "feature_recovery" in out and "explained_variance" in out
    run = tmp_path / "syn"
    curves = run / "training_curves.png"
    assert f"training curves: {curves}" in out
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curves.stat().st_size > 10_000
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train_steps"] == 150 and cfg["lr"] == 3e-3 and cfg["top_k"] == 4  # synthetic defaults + flags
    assert cfg["d_in"] == 64 and cfg["d_sae"] == 256  # the sizes the run derived, not null
    trained = json.loads((run / "eval.json").read_text())
    sae = load_sae(str(run / "sae"))
    assert sae.d_in == 64 and sae.d_sae == 256
    from saefast.data.synthetic import SyntheticActivations
    planted = SyntheticActivations(64, cfg["synthetic_features"], 8).true_features
    untrained = load_sae(str(run / "sae"))
    with torch.no_grad():
        untrained.W_dec.copy_(torch.nn.functional.normalize(
                torch.randn(untrained.W_dec.shape, generator=torch.Generator().manual_seed(5)), dim=1))
    assert trained["feature_recovery"] == pytest.approx(feature_recovery(sae.W_dec, planted))
    assert trained["feature_recovery"] > feature_recovery(untrained.W_dec, planted) + 0.2
    assert trained["explained_variance"] > 0.5 and 3.0 < trained["l0"] < 6.0
    # dead is the SAE's training counter, explained once in the output
    assert trained["dead_fraction"] == pytest.approx(sae.count_dead_features() / 256)
    assert f"dead: {sae.count_dead_features()} of 256 latents have not fired in the last 50 training steps" in out
    assert "128 planted features for 256 latents" in out

    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "explained_variance" in out and "feature_recovery" in out
    evaluated = json.loads((run / "eval.json").read_text())
    assert set(evaluated) == set(trained) and (evaluated["step"], evaluated["tokens"]) == (150, 150 * 256)
    for key, value in evaluated.items():  # the same held-out batches as at the end of training
        assert value == pytest.approx(trained[key], rel=1e-5, abs=1e-7), key
    (run / "eval.json").unlink()  # without eval.json, step and tokens come from the final eval row of metrics.jsonl
    assert main(["eval", str(run)]) == 0
    assert json.loads((run / "eval.json").read_text()) == pytest.approx(evaluated, rel=1e-5, abs=1e-7)


def test_total_tokens_sets_the_length_of_the_synthetic_run(tmp_path, capsys):
    argv = ["train", "--out-dir", str(tmp_path), "--run-name", "t", "--total-tokens", "2000", "--batch-size", "256",
            "--eval-batches", "1", *FAST]
    assert main(argv) == 0
    result = json.loads((tmp_path / "t" / "eval.json").read_text())
    assert (result["step"], result["tokens"]) == (8, 8 * 256)  # ceil(2000 / 256) steps, not the default 1500
    assert json.loads((tmp_path / "t" / "config.json").read_text())["train_steps"] is None


@pytest.mark.parametrize("flags,message", [
    (["--total-tokens", "5000", "--train-steps", "3"], "--total-tokens) has no effect when train_steps=3"),
    (["--context-size", "64"], "--context-size) only acts on a model run; this is the synthetic default"),
    (["--hook", "blocks.0.hook_resid_pre"], "--hook) only acts on a model run or a cache run"),
    (["--model-batch-size", "4"], "--model-batch-size) only acts on a model run"),
    (["--eval-ce-batches", "2"], "--eval-ce-batches) only acts on a model run"),
    (["--cache-dir", "acts", "--top-k", "4", "--synthetic-noise", "0.1"], "--synthetic-noise) only acts on the synthetic default"),
    (["--architecture", "relu", "--top-k", "4"], "--top-k) has no effect on architecture='relu'"),
    (["--architecture", "jumprelu", "--aux-penalty", "0.1"], "--aux-penalty) has no effect on architecture='jumprelu'"),
    (["--l1-coefficient", "0.5"], "--l1-coefficient) has no effect on architecture='batchtopk'"),
    (["--wandb-project", "mine"], "--wandb-project) has no effect without --wandb"),
    (["--e2e-batch-size", "4"], "--e2e-batch-size) has no effect without an end-to-end loss"),
    (["--e2e-downstream-hooks", "blocks.1.hook_resid_post"], "has no effect unless --e2e-block-mse-weight"),
    (["--d-sae", "100", "--expansion-factor", "3"], "--expansion-factor) has no effect when d_sae=100"),
])
def test_a_flag_that_would_be_ignored_is_refused_with_the_reason(tmp_path, capsys, flags, message):
    steps = [] if "--train-steps" in flags else ["--train-steps", "2"]
    assert main(["train", "--out-dir", str(tmp_path), "--run-name", "r", *steps, *FAST, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before any work


def test_progress_bar_is_drawn_once_and_log_lines_start_on_their_own_line(tmp_path):
    """The bar's final state appears once, and the final log line is not glued onto it."""
    env = {k: v for k, v in os.environ.items() if k != "SAEFAST_KILL_AFTER_STEP"}
    proc = subprocess.run([sys.executable, "-m", "saefast.cli", "train", "--out-dir", str(tmp_path), "--run-name", "p",
                           "--train-steps", "12", "--batch-size", "128", "--log-every", "3", "--eval-batches", "1",
                           "--no-tensorboard", "--checkpoint-every", "0"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    screen = [line.split("\r")[-1] if line.split("\r")[-1] else line for line in proc.stderr.split("\n")]
    finals = [line for line in proc.stderr.replace("\r", "\n").split("\n") if "12/12" in line]
    assert len(finals) == 1, finals
    finished = [line for line in screen if "finished 12 steps" in line]
    assert len(finished) == 1 and finished[0].split()[1] == "INFO", finished
    assert "12/12" not in finished[0] and "saefast p:" not in finished[0]


def test_config_file_and_errors(tmp_path, capsys):
    good = tmp_path / "run.yaml"
    good.write_text("train_steps: 3\nbatch_size: 64\nd_in: 8\nsynthetic_features: 16\nlr: 1e-3\n")
    assert main(["train", "--config", str(good), "--out-dir", str(tmp_path), "--run-name", "r", *FAST]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["d_in"] == 8
    assert main(["train", "--config", str(good), "--out-dir", str(tmp_path), "--run-name", "r", *FAST]) == 2
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown option(s) ['learning_rate']" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "no config.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# model runs, with a tiny random transformer-lens model and a dataset written by the test
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    return model_run_files(tmp_path_factory.mktemp("model_run"))


MODEL_ARGS = ["--model", "tiny", "--hook", "blocks.1.hook_resid_pre", "--context-size", "16",
              "--batch-size", "32", "--model-batch-size", "4", "--buffer-tokens", "128", "--eval-batches", "2",
              "--eval-ce-batches", "1", "--top-k", "4", "--expansion-factor", "2", "--lr", "0.01", *FAST]


def test_model_run_trains_with_e2e_losses_and_model_evals(model_run, monkeypatch, capsys):
    tmp, data, model = model_run
    monkeypatch.setattr("saefast.data.models.load_model", lambda name, device="cpu", dtype=None: model)
    argv = ["train", "--dataset", str(data), "--out-dir", str(tmp), "--run-name", "m", "--train-steps", "4",
            "--e2e-kl-weight", "0.5", "--e2e-block-mse-weight", "0.5", "--e2e-downstream-hooks",
            "blocks.2.hook_resid_post", "--log-every", "1", *MODEL_ARGS]
    assert main(argv) == 0, capsys.readouterr().err
    run = tmp / "m"
    metrics = json.loads((run / "eval.json").read_text())
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablation", "ce_loss_recovered", "kl", "explained_variance"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    assert metrics["kl"] >= 0 and metrics["ce_spliced"] >= metrics["ce_clean"] - 1e-3
    train = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in r]
    assert len(train) == 4 and all(r["e2e_kl_loss"] > 0 and r["e2e_block_mse"] > 0 for r in train)
    assert all(abs(r["loss"] - (r["mse_loss"] + r["aux_loss"] + 0.5 * r["e2e_kl_loss"] + 0.5 * r["e2e_block_mse"]))
               < 1e-5 for r in train)
    sae = load_sae(str(run / "sae"))
    assert sae.d_in == 16 and sae.config.hook_spec == "blocks.1.hook_resid_pre"
    assert main(["eval", str(run)]) == 0
    assert json.loads((run / "eval.json").read_text())["ce_spliced"] == pytest.approx(metrics["ce_spliced"], rel=1e-5)


@pytest.mark.parametrize("extra,message", [
    (["--hook", "blocks.1.hook_nothing"], "hook_resid_pre"),  # the valid names are listed
    (["--d-in", "12"], "d_in=12 does not match hook"),
    (["--context-size", "64"], "context"),
    (["--dataset", "EMPTY"], "empty"),
])
def test_model_run_bad_input_fails_before_work(model_run, monkeypatch, capsys, extra, message):
    tmp, data, model = model_run
    monkeypatch.setattr("saefast.data.models.load_model", lambda name, device="cpu", dtype=None: model)
    extra = [str(tmp / "empty.jsonl") if e == "EMPTY" else e for e in extra]
    argv = ["train", "--dataset", str(data), "--out-dir", str(tmp), "--run-name", "bad", *MODEL_ARGS, *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp / "bad").exists()


def test_cache_then_train_from_the_cache(model_run, monkeypatch, capsys):
    tmp, data, model = model_run
    monkeypatch.setattr("saefast.data.models.load_model", lambda name, device="cpu", dtype=None: model)
    cache = tmp / "cache"
    assert main(["cache", "--model", "tiny", "--hook", "blocks.1.hook_resid_pre", "--dataset", str(data),
                 "--context-size", "16", "--model-batch-size", "4", "--buffer-tokens", "128", "--batch-size", "32",
                 "--out", str(cache), "--n-tokens", "256", "--shard-tokens", "100"]) == 0, capsys.readouterr().err
    assert "wrote 256 activations" in capsys.readouterr().out
    argv = ["train", "--cache-dir", str(cache), "--out-dir", str(tmp), "--run-name", "c", "--train-steps", "5",
            "--batch-size", "32", "--eval-batches", "1", "--top-k", "4", *FAST]
    assert main(argv) == 0, capsys.readouterr().err
    assert load_sae(str(tmp / "c" / "sae")).d_in == 16
    assert main([*argv[:6], "c2", "--d-in", "8", *argv[7:]]) == 2
    assert "d_in=8 does not match the cache" in capsys.readouterr().err
