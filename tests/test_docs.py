"""Every code block of README.md and docs/*.md runs as written, on a CPU, with models and data made
locally (no network).

* ```python blocks: each in a process of its own, in an empty folder, so a block that defines an
  SAE variant cannot leak its registration into another. The processes are forked from a server
  that imported torch and saefast once, which keeps this test fast.
* ```bash blocks: each command in a shell, in an empty folder, blocks in order of the page (a
  command may use what an earlier one in the same block wrote); the few commands not run here
  are listed in NOT_RUN with the reason.
* ```text blocks are shown, not run (commands that need a model from the hub, placeholders such
  as ``runs/<run>``, file listings).
"""
from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path
from typing import List, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = ("python", "bash", "text")
BLOCK_TIMEOUT_S = 120

# Commands of ```bash blocks that this test does not run, and why.
NOT_RUN = {
    'pip install -e ".[test]" && python -m pytest tests/ -q -x': "the test suite itself (CI runs exactly this "
                                                                  "line)",
    'pip install -e ".[test]" && saefast train': "an install and the full synthetic default (1500 steps); "
                                                 "tests/training/test_train_cli.py runs the same training with "
                                                 "--train-steps 150, and the docs' bash blocks run shortened ones",
    "python -m pytest benchmarks/ --benchmark-only": "minutes of benchmarks; docs/benchmarks.md",
    "python -m pytest benchmarks/ --benchmark-only --save-results": "minutes of benchmarks, and writes results",
    "python benchmarks/report.py": "rewrites README.md's performance table",
    "bash benchmarks/fetch_peer_wheels.sh": "downloads peer wheels from the package index",
    "SAEFAST_COMMIT=<sha of the checked-out commit> bash benchmarks/gpu_check.sh": "needs a GPU",
}


class Block(NamedTuple):
    path: Path
    line: int
    language: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def read_blocks() -> List[Block]:
    blocks = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        start = None
        for i, line in enumerate(lines):
            if not line.startswith("```"):
                continue
            if start is None:
                start, language = i, line[3:].strip()
            else:
                blocks.append(Block(path, start + 1, language, "\n".join(lines[start + 1:i]) + "\n"))
                start = None
        assert start is None, f"{path.name}:{start + 1}: a code block is never closed"
    return blocks


BLOCKS = read_blocks()
PYTHON = [b for b in BLOCKS if b.language == "python"]
BASH = [b for b in BLOCKS if b.language == "bash"]


def commands(block: Block) -> List[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block.code)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def test_every_block_says_what_it_is():
    unlabelled = [b.name for b in BLOCKS if b.language not in LANGUAGES]
    assert not unlabelled, f"label these fences ```python, ```bash or ```text: {unlabelled}"
    assert len(PYTHON) >= 15 and BASH


def test_commands_not_run_are_still_in_the_docs():
    present = {c for b in BASH for c in commands(b)}
    stale = sorted(set(NOT_RUN) - present)
    assert not stale, f"NOT_RUN lists commands no longer in the docs: {stale}"


# ------------------------------------------------------------------------------------------------
# python blocks
# ------------------------------------------------------------------------------------------------

# What the blocks import, loaded once by the server they are forked from (torch._dynamo: the fused
# Adam optimizer imports it; matplotlib: the trainer draws training curves).
_PRELOAD = ["torch", "torch._dynamo", "saefast", "saefast.sae", "saefast.training", "saefast.analysis",
            "matplotlib.figure", "matplotlib.backends.backend_agg", "saefast.data.models", "saefast.evals.model_evals",
            "transformer_lens", "datasets"]


def _run_python(code: str, name: str, folder: str) -> None:
    """Child process: run ``code`` as a script in ``folder``, output to files there."""
    os.chdir(folder)
    sys.stdout = open("stdout.txt", "w", buffering=1)
    sys.stderr = open("stderr.txt", "w", buffering=1)
    try:
        exec(compile(code, name, "exec"), {"__name__": "__main__", "__file__": name})
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def block_server():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


@pytest.mark.parametrize("block", PYTHON, ids=[b.name for b in PYTHON])
def test_python_block_runs(block, block_server, tmp_path):
    child = block_server.Process(target=_run_python, args=(block.code, block.name, str(tmp_path)))
    child.start()
    child.join(BLOCK_TIMEOUT_S)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"{block.name} ran longer than {BLOCK_TIMEOUT_S} s")
    err = (tmp_path / "stderr.txt").read_text() if (tmp_path / "stderr.txt").exists() else ""
    assert child.exitcode == 0, f"{block.name} failed:\n{block.code}\n{err}"


# ------------------------------------------------------------------------------------------------
# bash blocks
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", BASH, ids=[b.name for b in BASH])
def test_bash_block_runs(block, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAEFAST_KILL")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for command in commands(block):
        if command in NOT_RUN:
            continue
        proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT_S)
        assert proc.returncode == 0, f"{block.name}: `{command}` failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_readme_says_how_to_get_a_cpu_torch_and_opens_with_two_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = readme.split("```")[0]
    assert "--index-url https://download.pytorch.org/whl/cpu" in setup and 'pip install -e ".[test]"' in setup
    first = next(b for b in BLOCKS if b.path.name == "README.md")
    assert commands(first) == ['pip install -e ".[test]" && saefast train',
                               'pip install -e ".[test]" && python -m pytest tests/ -q -x']


# ------------------------------------------------------------------------------------------------
# contracts, not provenance
# ------------------------------------------------------------------------------------------------

PROVENANCE = re.compile(r"the user'?s (notes|api|code)|\bseeds?/|\bseed 0\d\d\b|design notes", re.IGNORECASE)


def test_code_docs_and_help_speak_of_contracts_not_where_ideas_came_from():
    """Docstrings, comments, help texts and docs name the contract ("the classic SAE API", "the
    SAELens layout"), never the notes an idea came from."""
    files = [*DOCS, *(ROOT / "saefast").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"),
             *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tests").rglob("*.py")]
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in files if path != Path(__file__).resolve()
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if PROVENANCE.search(line)]
    assert not found, "say what the code does, not where the idea came from:\n" + "\n".join(found)
