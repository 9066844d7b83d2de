"""Kill a real training process mid-run, resume it, and get bit-identical weights."""
import json

import pytest

from saefast.cli import main

from train_helpers import saved_weights, train_in_subprocess

ARGS = ["--d-in", "16", "--synthetic-features", "32", "--synthetic-active", "2", "--batch-size", "64",
        "--top-k", "2", "--expansion-factor", "4", "--train-steps", "14", "--lr", "0.03", "--lr-warmup-steps", "3",
        "--n-batches-to-dead", "3", "--eval-batches", "1", "--checkpoint-every", "4", "--log-every", "1",
        "--no-progress-bar", "--no-tensorboard", "--normalize", "dataset_scale"]


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    full = train_in_subprocess(tmp_path, "--run-name", "full", *ARGS)
    assert full.returncode == 0, full.stderr
    killed = train_in_subprocess(tmp_path, "--run-name", "killed", *ARGS, env={"SAEFAST_KILL_AFTER_STEP": "10"})
    assert killed.returncode == 75, killed.stderr  # os._exit: no cleanup, no final checkpoint
    run = tmp_path / "killed"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert not (run / "sae").exists()
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == 10

    resumed = train_in_subprocess(tmp_path, "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    want, got = saved_weights(tmp_path / "full"), saved_weights(run)
    assert want.keys() == got.keys() and want
    for name in want:
        assert (want[name] == got[name]).all(), f"{name} differs after resume"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 15)), "steps logged by the killed run after its checkpoint are replaced"
    assert json.loads((run / "eval.json").read_text()) == pytest.approx(
        json.loads((tmp_path / "full" / "eval.json").read_text()))

    # a resume with a different training option is refused before any work
    assert main(["train", "--resume", str(run), "--lr", "0.5"]) == 2
