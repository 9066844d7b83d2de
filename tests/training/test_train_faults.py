"""Faults during training: damaged checkpoints, runs killed before their first checkpoint or after
the final eval, full disks, and bad command lines. Each must end in a clear one-line error or a
resume that gives the uninterrupted run's result, bit for bit, with no metrics row written twice."""
import errno
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError

from saefast.cli import main

from train_helpers import saved_weights, train_in_subprocess

ARGS = ["--d-in", "16", "--synthetic-features", "32", "--synthetic-active", "2", "--batch-size", "64",
        "--top-k", "2", "--expansion-factor", "4", "--train-steps", "12", "--lr", "0.03", "--lr-warmup-steps", "3",
        "--n-batches-to-dead", "3", "--eval-batches", "1", "--checkpoint-every", "4", "--log-every", "1",
        "--no-progress-bar", "--no-tensorboard", "--normalize", "dataset_scale"]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_as_full(run, full):
    want, got = saved_weights(full), saved_weights(run)
    assert want.keys() == got.keys() and want
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name} differs from the uninterrupted run"
    assert json.loads((run / "eval.json").read_text()) == json.loads((full / "eval.json").read_text())
    rows = _rows(run)
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 13)), "every step logged once"
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [12], "the final eval logged once"


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted run every faulty one is compared with."""
    out = tmp_path_factory.mktemp("full")
    done = train_in_subprocess(out, "--run-name", "full", *ARGS)
    assert done.returncode == 0, done.stderr
    return out / "full"


# ---------------------------------------------------------------------------------------------
# damaged checkpoints (a truncated file in the latest one)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def killed_at_10(tmp_path_factory):
    """A run killed (os._exit) after step 10: checkpoints at steps 4 and 8, rows up to step 10."""
    out = tmp_path_factory.mktemp("killed")
    killed = train_in_subprocess(out, "--run-name", "run", *ARGS, env={"SAEFAST_KILL_AFTER_STEP": "10"})
    assert killed.returncode == 75, killed.stderr
    assert (out / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    return out / "run"


@pytest.mark.parametrize("damaged", ["sae.safetensors", "trainer.pt", "rank0.pt"])
def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, full, killed_at_10, caplog, damaged):
    run = tmp_path / "run"
    shutil.copytree(killed_at_10, run)
    ckpts = run / "checkpoints"
    path = ckpts / "step_00000008" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main(["train", "--resume", str(run)]) == 0
    assert f"checkpoint {ckpts / 'step_00000008'} cannot be read: {path} is truncated or damaged" in caplog.text
    assert f"resuming from {ckpts / 'step_00000004'} instead (the unreadable checkpoint is kept as " \
        "damaged-step_00000008)" in caplog.text
    assert sorted(p.name for p in ckpts.iterdir()) == ["damaged-step_00000008", "latest", "step_00000008",
                                                       "step_00000012"]
    _assert_same_as_full(run, full)


def test_resume_with_every_checkpoint_damaged_says_how_to_restart(tmp_path, killed_at_10, capsys):
    run = tmp_path / "run"
    shutil.copytree(killed_at_10, run)
    for step in ("step_00000004", "step_00000008"):
        (run / "checkpoints" / step / "trainer.pt").write_bytes(b"")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"saefast train: error: no checkpoint in {run / 'checkpoints'} "
                                                   "can be read") and "move the checkpoints folder away" in err


# ---------------------------------------------------------------------------------------------
# killed before the first checkpoint, or after the final eval
# ---------------------------------------------------------------------------------------------

def test_run_killed_before_its_first_checkpoint_resumes_from_step_zero(tmp_path, full, caplog, capsys):
    killed = train_in_subprocess(tmp_path, "--run-name", "run", *ARGS, env={"SAEFAST_KILL_AFTER_STEP": "3"})
    assert killed.returncode == 75, killed.stderr
    run = tmp_path / "run"
    assert not (run / "checkpoints").exists() and len(_rows(run)) == 3
    # what a kill inside the first checkpoint write or an SAE save leaves
    (run / "checkpoints" / ".tmp-step_00000004").mkdir(parents=True)
    (run / "checkpoints" / ".tmp-step_00000004" / "rank0.pt").write_bytes(b"half")
    (run / ".sae.tmp-abcd1234").mkdir()
    assert main(["train", "--out-dir", str(tmp_path), "--run-name", "run", *ARGS]) == 2
    assert f"pass --resume {run} to continue it" in capsys.readouterr().err
    caplog.set_level(logging.INFO)
    assert main(["train", "--resume", str(run)]) == 0
    assert "has no checkpoint yet (the run stopped before its first one): starting it again from step 0" in caplog.text
    assert "removed what an interrupted run left half-written" in caplog.text
    assert not (run / ".sae.tmp-abcd1234").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000008", "step_00000012"]
    _assert_same_as_full(run, full)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, and no handler of the library catches it."""


def test_kill_after_the_final_eval_logs_no_row_twice(tmp_path, full, monkeypatch):
    from saefast import io as sio

    def killed(*args, **kwargs):
        raise Killed()
    monkeypatch.setattr(sio, "save_sae", killed)  # the step after the final eval row is written
    with pytest.raises(Killed):
        main(["train", "--out-dir", str(tmp_path), "--run-name", "run", *ARGS])
    monkeypatch.undo()
    run = tmp_path / "run"
    assert [r["step"] for r in _rows(run) if r["kind"] == "eval"] == [12]
    assert main(["train", "--resume", str(run)]) == 0
    _assert_same_as_full(run, full)


# ---------------------------------------------------------------------------------------------
# full disks
# ---------------------------------------------------------------------------------------------

def _safetensors_out_of_space(calls_before_failing, real):
    """save_file that works ``calls_before_failing`` times, then fails as it does on a full disk."""
    count = {"n": 0}

    def save_file(*args, **kwargs):
        count["n"] += 1
        if count["n"] <= calls_before_failing:
            return real(*args, **kwargs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return save_file


def _torch_out_of_space(monkeypatch, calls_before_failing):
    """Files written by torch.save that run out of space (OSError ENOSPC after 100 bytes) from
    call ``calls_before_failing + 1`` on: the real torch.save then fails as it does on a full disk."""
    from saefast import utils

    count = {"n": 0}

    class Full:
        def __init__(self, file):
            self.file, self.left = file, 100

        def write(self, data):
            if self.left < len(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= len(data)
            return self.file.write(data)

        def flush(self):
            self.file.flush()

    class Writer(utils._RecordingWriter):
        def __init__(self, file):
            count["n"] += 1
            super().__init__(Full(file) if count["n"] > calls_before_failing else file)
    monkeypatch.setattr(utils, "_RecordingWriter", Writer)


@pytest.mark.parametrize("where", ["sae.safetensors", "trainer.pt"])
def test_full_disk_at_a_checkpoint_names_the_file_and_the_last_checkpoint(tmp_path, full, monkeypatch, capsys, where):
    from saefast.training import checkpoint

    if where == "sae.safetensors":
        monkeypatch.setattr(checkpoint, "save_file", _safetensors_out_of_space(1, checkpoint.save_file))
    else:  # each checkpoint writes rank0.pt, then trainer.pt: the fourth file is the second trainer.pt
        _torch_out_of_space(monkeypatch, 3)
    assert main(["train", "--out-dir", str(tmp_path), "--run-name", "run", *ARGS]) == 1
    monkeypatch.undo()
    ckpts = tmp_path / "run" / "checkpoints"
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"saefast train: error: no space left on device while writing {ckpts / 'step_00000008' / where}; "
                   f"the last complete checkpoint is {ckpts / 'step_00000004'}")
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000004"], "the half checkpoint is gone"
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    _assert_same_as_full(tmp_path / "run", full)


def test_full_disk_in_the_metrics_log_and_the_final_save(tmp_path, full, monkeypatch, capsys):
    from saefast import io as sio
    from saefast.training import metrics_log

    class FullAfter:
        """metrics.jsonl that runs out of space at its sixth row."""

        def __init__(self, real):
            self.real, self.rows = real, 0

        def write(self, text):
            self.rows += 1
            if self.rows == 6:
                self.real.write(text[:5])
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.real.write(text)

        def __getattr__(self, name):
            return getattr(self.real, name)

    real_init = metrics_log.MetricLogger.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if self.enabled:
            self._file = FullAfter(self._file)
    monkeypatch.setattr(metrics_log.MetricLogger, "__init__", init)
    run = tmp_path / "run"
    assert main(["train", "--out-dir", str(tmp_path), "--run-name", "run", *ARGS]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"saefast train: error: no space left on device while writing {run / 'metrics.jsonl'}; "
                   f"the last complete checkpoint is {run / 'checkpoints' / 'step_00000004'}")
    monkeypatch.undo()

    monkeypatch.setattr(sio, "save_file", _safetensors_out_of_space(0, sio.save_file))  # then the final SAE
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"saefast train: error: no space left on device while writing {run / 'sae' / 'sae_weights.safetensors'}; "
                   f"the last complete checkpoint is {run / 'checkpoints' / 'step_00000012'}")
    assert not (run / "sae").exists() and not [p for p in run.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0  # the metrics line cut short is dropped, with a warning
    _assert_same_as_full(run, full)


def test_curves_that_cannot_be_drawn_do_not_fail_a_finished_run(tmp_path, monkeypatch, capsys, caplog):
    from saefast.analysis import plots

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "training_curves.png")
    monkeypatch.setattr(plots, "plot_training_curves", full_disk)
    assert main(["train", "--out-dir", str(tmp_path), "--run-name", "run", *ARGS]) == 0
    out = capsys.readouterr().out
    assert "SAE saved to" in out and "training curves:" not in out
    assert "could not draw" in caplog.text and (tmp_path / "run" / "sae" / "cfg.json").is_file()


@pytest.mark.skipif(shutil.which("unshare") is None or subprocess.run(
    ["unshare", "-rm", "true"], capture_output=True).returncode != 0,
    reason="needs unprivileged user and mount namespaces (unshare -rm) for a small tmpfs")
def test_a_real_full_disk_then_resume(tmp_path):
    """A run on a 3 MB tmpfs (mounted in a private namespace, no root needed) fills it at its
    second checkpoint: one line of error, the first checkpoint intact, nothing half-written; on a
    larger tmpfs the resume then completes to the uninterrupted result."""
    mnt, keep = tmp_path / "mnt", tmp_path / "keep"
    mnt.mkdir()
    keep.mkdir()
    big = ["--expansion-factor", "290"]  # about 1.8 MB a checkpoint: the second one does not fit
    cmd = [sys.executable, "-m", "saefast.cli", "train", "--out-dir", str(mnt)]
    script = (f"mount -t tmpfs -o size=3m tmpfs {mnt} && "
              f"{' '.join(cmd)} --run-name run {' '.join(ARGS)} {' '.join(big)} 2> {keep}/first.err; "
              f"echo $? > {keep}/first.rc; ls -A {mnt}/run {mnt}/run/checkpoints > {keep}/listing; "
              f"mount -o remount,size=64m {mnt} && {' '.join(cmd[:-2])} --resume {mnt}/run 2> {keep}/second.err; "
              f"echo $? > {keep}/second.rc; cp -r {mnt}/run {keep}/run")
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env=os.environ, timeout=600, check=True)
    first = (keep / "first.err").read_text().strip().splitlines()
    assert (keep / "first.rc").read_text().strip() == "1", first[-5:]
    ckpts = mnt / "run" / "checkpoints"
    assert first[-1].startswith("saefast train: error: no space left on device while writing "
                                f"{ckpts / 'step_00000008'}/"), first[-1]
    assert first[-1].endswith(f"; the last complete checkpoint is {ckpts / 'step_00000004'}"), first[-1]
    listing = (keep / "listing").read_text()
    assert "step_00000004" in listing and ".tmp-" not in listing
    assert (keep / "second.rc").read_text().strip() == "0", (keep / "second.err").read_text()[-2000:]
    rows = _rows(keep / "run")
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [12]


# ---------------------------------------------------------------------------------------------
# bad command lines: one line naming the flag or file and the fix, nothing written
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,names", [
    (["--device", "gpu"], "device='gpu' (--device) is not a device name: use cpu, cuda or cuda:N"),
    (["--device", "cuda"], "device='cuda' (--device): this machine has no usable CUDA device"),
    (["--config", "BAD_YAML"], "config file bad.yaml is not valid YAML: expected ',' or ']', but got ':' at line 2"),
    (["--out-dir", "A_FILE"], "(--out-dir) is a file, not a folder; run folders go inside out_dir"),
    (["--model", "./models/missing", "--hook", "blocks.0.hook_resid_pre", "--dataset", "d.jsonl"],
     "model folder ./models/missing (--model) does not exist"),
    (["--model", "A_FILE", "--hook", "blocks.0.hook_resid_pre", "--dataset", "d.jsonl"], "(--model) is a file"),
])
def test_bad_command_lines_end_in_one_line(tmp_path, monkeypatch, capsys, argv, names):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "bad.yaml").write_text("lr: [1, 2\ntop_k: 3\n")
    argv = [{"BAD_YAML": "bad.yaml", "A_FILE": "a_file"}.get(a, a) for a in argv]
    if "--out-dir" not in argv:
        argv += ["--out-dir", "runs"]
    assert main(["train", *argv, "--top-k", "2", "--no-progress-bar"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("saefast train: error: ") and names in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "bad.yaml"], "nothing was written"


@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_eval_and_analyze_check_the_device_first(full, capsys, command):
    before = sorted(p.name for p in full.iterdir())
    assert main([command, str(full), "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device='gpu' (--device)" in err, err
    assert sorted(p.name for p in full.iterdir()) == before
