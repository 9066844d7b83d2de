"""saefast benchmark harness: sizes per device, timing, peak memory and the results file.

Run ``python -m pytest benchmarks/ --benchmark-only`` (add ``--save-results`` to write
``benchmarks/results/<date>-<device>.json``; then ``python benchmarks/report.py`` rebuilds the
README table and ``benchmarks/results/perf.png``). See docs/benchmarks.md.

* Sizes follow the device (``SIZES``): the CPU profile fits 2 cores in minutes, the CUDA
  profile is the issue's GPU problem. ``SAEFAST_BENCH_PROFILE=quick`` runs everything at toy
  sizes in seconds (a smoke test of the harness); ``SAEFAST_BENCH_DEVICE`` picks the device.
* Timing: each contender is warmed up, then timed by pytest-benchmark for a number of rounds
  chosen so a test takes about ``target_seconds``; on CUDA every timed call ends with
  ``torch.cuda.synchronize()``. Figures are medians.
* Every figure also goes to ``benchmark.extra_info`` and to the results file, with its unit and
  the shapes; speed-ups against each baseline and multiples of the floor are derived there.
* Benchmarks report; they never fail for being slow. A contender that runs out of memory is
  recorded as such and skipped.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

BENCH_DIR = Path(__file__).resolve().parent


def _names_benchmarks(args) -> bool:
    """Whether these command-line arguments name this folder or something in it."""
    for arg in args:
        path = Path(str(arg).split("::")[0])
        if path.exists() and (path.resolve() == BENCH_DIR or BENCH_DIR in path.resolve().parents):
            return True
    return False


# On a CPU shared with other work, OpenMP threads that spin while they wait make every figure
# depend on the neighbours (a 2-thread saefast step measured 2.5 s spinning, 0.6 s passive, at
# load 2.5 on 2 cores). Wait passively unless the caller chose; it must be set before torch loads,
# and only when the benchmarks were asked for (a plain `pytest` at the root passes through here).
_OMP_POLICY_PRESET = "OMP_WAIT_POLICY" in os.environ
_TORCH_PRELOADED = "torch" in sys.modules
if _names_benchmarks(sys.argv[1:]):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(BENCH_DIR))  # sae_steps and memory_probe sit beside this file

import saefast  # noqa: E402
from saefast.ops import backend_name  # noqa: E402
from sae_steps import Problem  # noqa: E402

RESULTS_DIR = BENCH_DIR / "results"
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Sizes:
    """One profile of benchmark shapes (see SIZES)."""

    profile: str
    d_in: int
    batch: int
    k: int
    d_sae_sweep: Tuple[int, ...]  # whole-step time and memory against d_sae
    d_sae_main: int  # the headline point: per-op benchmarks, peers, the floor
    k_sweep: Tuple[int, ...]  # whole-step time against k ...
    k_sweep_d_sae: int  # ... at this d_sae
    dtypes: Tuple[torch.dtype, ...]
    k_aux: int
    min_rounds: int
    max_rounds: int
    target_seconds: float  # rounds are chosen so one test takes about this long
    memory_budget: Optional[int]  # CPU: memory the largest-d_sae search may use (None: the GPU's)
    search_start: int  # first d_sae of the largest-d_sae search
    search_timeout: int  # seconds for one contender's search
    step_rounds: int  # interleaved rounds of the whole-step benchmark (every contender once a round)
    step_dead_fractions: Tuple[float, ...]  # whole-step benchmark points: fraction of dead latents
    step_dense_dead_fractions: Tuple[float, ...]  # ... of which these also time the dense baseline
    step_memory_dead_fractions: Tuple[float, ...]  # ... and these measure each contender's peak memory


SIZES_BY_PROFILE: Dict[str, Sizes] = {
    "cpu": Sizes("cpu", d_in=512, batch=1024, k=32, d_sae_sweep=(16384, 32768, 65536), d_sae_main=65536,
                 k_sweep=(16, 32, 64, 128, 256), k_sweep_d_sae=32768, dtypes=(torch.float32,), k_aux=512,
                 min_rounds=3, max_rounds=10, target_seconds=2.0, memory_budget=2 * GiB,
                 search_start=16384, search_timeout=240, step_rounds=15, step_dead_fractions=(0.0, 0.05, 0.25),
                 step_dense_dead_fractions=(0.25,), step_memory_dead_fractions=(0.25,)),
    "cuda": Sizes("cuda", d_in=2304, batch=4096, k=64, d_sae_sweep=tuple(2 ** i for i in range(14, 21)),
                  d_sae_main=131072, k_sweep=(16, 32, 64, 128, 256), k_sweep_d_sae=131072,
                  dtypes=(torch.float32, torch.bfloat16), k_aux=512, min_rounds=5, max_rounds=100,
                  target_seconds=1.0, memory_budget=None, search_start=131072, search_timeout=420,
                  step_rounds=30, step_dead_fractions=(0.0, 0.05, 0.25), step_dense_dead_fractions=(0.0, 0.05, 0.25),
                  step_memory_dead_fractions=(0.25,)),
    "quick": Sizes("quick", d_in=64, batch=128, k=8, d_sae_sweep=(1024, 2048), d_sae_main=2048,
                   k_sweep=(4, 8), k_sweep_d_sae=1024, dtypes=(torch.float32,), k_aux=32, min_rounds=1,
                   max_rounds=2, target_seconds=0.05, memory_budget=256 << 20, search_start=1024,
                   search_timeout=120, step_rounds=3, step_dead_fractions=(0.0, 0.25),
                   step_dense_dead_fractions=(0.25,), step_memory_dead_fractions=(0.25,)),
}


def _device() -> str:
    choice = os.environ.get("SAEFAST_BENCH_DEVICE", "").strip()
    if choice:
        return choice
    return "cuda" if torch.cuda.is_available() else "cpu"


DEVICE = _device()
IS_CUDA = DEVICE.startswith("cuda")
PROFILE = os.environ.get("SAEFAST_BENCH_PROFILE", "").strip() or ("cuda" if IS_CUDA else "cpu")
if PROFILE not in SIZES_BY_PROFILE:
    raise ValueError(f"SAEFAST_BENCH_PROFILE={PROFILE!r} is not one of {sorted(SIZES_BY_PROFILE)}")
SIZES = SIZES_BY_PROFILE[PROFILE]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def problem(d_sae: Optional[int] = None, *, k: Optional[int] = None,
            dtype: torch.dtype = torch.float32, dead_fraction: Optional[float] = None) -> Problem:
    """The profile's problem at this d_sae / k / dtype (/ fraction of dead latents)."""
    extra = {} if dead_fraction is None else {"dead_fraction": dead_fraction}
    return Problem(d_in=SIZES.d_in, d_sae=d_sae or SIZES.d_sae_main, batch=SIZES.batch, k=k or SIZES.k,
                   k_aux=SIZES.k_aux, dtype=dtype, device=DEVICE, **extra)


# ----------------------------------------------------------------------------------------------
# Collection: the suite's files are bench_*.py
# ----------------------------------------------------------------------------------------------

def pytest_collect_file(file_path: Path, parent):
    # Only when benchmarks/ (or a file in it) is named: a plain `pytest` runs the tests alone.
    # Files named on the command line are collected by pytest itself whatever their name.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and _names_benchmarks(parent.config.args) and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_addoption(parser):
    group = parser.getgroup("saefast benchmarks")
    group.addoption("--save-results", action="store_true", default=False,
                    help="write every figure to benchmarks/results/<date>-<device>.json")
    group.addoption("--results-path", default=None,
                    help="write the results file here instead (implies --save-results)")
    group.addoption("--results-tag", default="",
                    help="appended to the results file's name (a suite run in parts: one file per part)")


# ----------------------------------------------------------------------------------------------
# Device helpers: synchronise, free, measure memory
# ----------------------------------------------------------------------------------------------

def synchronize() -> None:
    if IS_CUDA:
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if IS_CUDA:
        torch.cuda.empty_cache()


def out_of_memory_errors() -> Tuple[type, ...]:
    """Exceptions that mean "does not fit": CUDA OOM, and the CPU allocator's failures."""
    return (torch.OutOfMemoryError, MemoryError)


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, out_of_memory_errors()):
        return True
    return isinstance(err, RuntimeError) and bool(
        re.search(r"out of memory|can't allocate memory|DefaultCPUAllocator", str(err)))


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_in_use() -> int:
    """Bytes in use now: CUDA allocated memory, or the process's resident set on the CPU."""
    if IS_CUDA:
        return torch.cuda.memory_allocated()
    return _proc_status_kib("VmRSS") * 1024


def peak_memory_of(fn: Callable[[], None]) -> Optional[int]:
    """Peak bytes in use while ``fn`` runs (CUDA: allocator peak; CPU: peak RSS), or None where
    the peak cannot be reset (non-Linux CPU)."""
    free_memory()
    if IS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    if not _reset_peak_rss():
        return None
    fn()
    return _proc_status_kib("VmHWM") * 1024


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def time_it(benchmark, fn: Callable[[], object], *, warmup: Optional[int] = None) -> Optional[float]:
    """Time ``fn`` with pytest-benchmark (synchronising CUDA inside every call); returns the
    median in seconds, or None when benchmarking is disabled. Warm-up calls: two on CUDA
    (Triton compiles, allocator settles), one elsewhere (optimizer state)."""
    warmup = (2 if IS_CUDA else 1) if warmup is None else warmup

    def call() -> None:
        fn()
        synchronize()

    t0 = time.perf_counter()
    for _ in range(warmup):  # first calls compile Triton kernels and allocate optimizer state
        t0 = time.perf_counter()
        call()
    once = max(time.perf_counter() - t0, 1e-7)
    rounds = int(min(SIZES.max_rounds, max(SIZES.min_rounds, SIZES.target_seconds // once)))
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(benchmark, "disabled", False):
        return None
    return float(stats.stats.median)


def time_interleaved(benchmark, contenders: Dict[str, Callable[[], object]], rounds: int, *,
                     warmup: Optional[int] = None) -> Dict[str, List[float]]:
    """Time several contenders round by round: every round runs each contender once, starting one
    further along the list than the round before, so drift on a shared machine (other work, clock
    changes, thermal state) hits all of them alike and none always follows the same neighbour.

    Returns each contender's seconds per round (CUDA calls synchronise inside the timed span).
    pytest-benchmark times the rounds as a whole. Each contender is first warmed up (see time_it).
    """
    warmup = (2 if IS_CUDA else 1) if warmup is None else warmup
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
            synchronize()
    times: Dict[str, List[float]] = {name: [] for name in names}
    done = [0]

    def one_round() -> None:
        shift = done[0] % len(names)
        done[0] += 1
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            contenders[name]()
            synchronize()
            times[name].append(time.perf_counter() - t0)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    return times


def spread(values: List[float]) -> Dict[str, float]:
    """min, median and max of a list of per-round figures."""
    ordered = sorted(values)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
    return {"min": ordered[0], "median": median, "max": ordered[-1]}


def verdict(ratio: Dict[str, float]) -> str:
    """"faster" / "slower" only when every round agrees (the range of ``other / saefast``
    excludes 1), else "level"."""
    if ratio["min"] > 1:
        return "faster"
    if ratio["max"] < 1:
        return "slower"
    return "level"


def step_peak_memory(impl: str, p: Problem, timeout: int = 600) -> Optional[int]:
    """Peak bytes of one step of ``impl`` on ``p`` beyond what was in use before it was built,
    measured in a fresh process (``step_peak.py``); None where it cannot be measured."""
    cmd = [sys.executable, str(BENCH_DIR / "step_peak.py"), "--impl", impl, "--device", p.device,
           "--d-in", str(p.d_in), "--d-sae", str(p.d_sae), "--batch", str(p.batch), "--k", str(p.k),
           "--k-aux", str(p.k_aux), "--dead-fraction", str(p.dead_fraction), "--dtype", dtype_name(p.dtype)]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return lines[-1]["peak_bytes"] if proc.returncode == 0 and lines else None


# ----------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------

_FIGURES: List[dict] = []
_SESSION: Dict[str, object] = {}


def _key(group: str, params: Dict[str, object]) -> Tuple:
    return (group,) + tuple(sorted((k, str(v)) for k, v in params.items()))


def _times_by_impl(group: str, params: Dict[str, object]) -> Dict[str, float]:
    key = _key(group, params)
    return {f["impl"]: f["value"] for f in _FIGURES
            if f["metric"] == "time" and f["value"] is not None and _key(f["group"], f["params"]) == key}


class Recorder:
    """Stores figures for one test: into ``benchmark.extra_info`` and the session's results."""

    def __init__(self, benchmark, nodeid: str):
        self.benchmark = benchmark
        self.nodeid = nodeid

    def figure(self, *, group: str, impl: str, params: Dict[str, object], metric: str,
               value: Optional[float], unit: str, notes: str = "", extra_info: bool = True, **extra) -> dict:
        """Record one figure; ``extra_info=False`` keeps it out of ``benchmark.extra_info`` (a test
        that records many contenders writes its own summary there)."""
        fig = {"test": self.nodeid, "group": group, "impl": impl, "params": dict(params),
               "metric": metric, "value": value, "unit": unit}
        if notes:
            fig["notes"] = notes
        fig.update(extra)
        _FIGURES.append(fig)
        if not extra_info:
            return fig
        info = self.benchmark.extra_info if self.benchmark is not None else {}
        info.update({"group": group, "impl": impl, **params})
        info[f"{metric}_{unit}"] = value
        if notes:
            info["notes"] = notes
        info.update(extra)
        return fig

    def time(self, *, group: str, impl: str, params: Dict[str, object], seconds: Optional[float],
             notes: str = "", **extra) -> None:
        """A median time; adds the speed-ups against the contenders already timed on this point."""
        self.figure(group=group, impl=impl, params=params, metric="time", value=seconds, unit="s",
                    notes=notes, rounds=self._rounds(), **extra)
        if seconds is None or self.benchmark is None:
            return
        times = _times_by_impl(group, params)
        if impl.startswith("saefast"):
            for other, t in times.items():
                if not other.startswith("saefast"):
                    self.benchmark.extra_info[f"speedup_vs_{other}"] = round(t / seconds, 3)
        elif "saefast" in times:
            self.benchmark.extra_info["saefast_speedup"] = round(seconds / times["saefast"], 3)

    def out_of_memory(self, *, group: str, impl: str, params: Dict[str, object], error: str) -> None:
        self.figure(group=group, impl=impl, params=params, metric="time", value=None, unit="s",
                    notes="out of memory", error=error[:300])

    def _rounds(self) -> Optional[int]:
        stats = getattr(self.benchmark, "stats", None)
        return int(stats.stats.rounds) if stats is not None else None


@pytest.fixture
def record(request, benchmark) -> Recorder:
    """A :class:`Recorder` bound to this test's ``benchmark``."""
    return Recorder(benchmark, request.node.nodeid)


def run_contender(benchmark, record: Recorder, *, group: str, impl: str, params: Dict[str, object],
                  build: Callable[[], object], call: Callable[[object], Callable[[], object]],
                  notes: Callable[[object], str] = lambda built: "", memory: bool = False) -> None:
    """Build a contender, time it, optionally measure one call's peak memory, and record.

    Running out of memory (building or running) is recorded and the test skipped.
    ``memory`` measures the bytes the contender holds at its peak in one call beyond what was in
    use before it was built (its weights, gradients, optimizer state and temporaries).
    """
    free_memory()
    base = memory_in_use()
    oom = None
    built = fn = None
    try:
        built = build()
        fn = call(built)
        seconds = time_it(benchmark, fn)
        peak = peak_memory_of(fn) if memory else None
        text = notes(built)
    except Exception as err:  # noqa: BLE001 - only memory failures are swallowed
        if not is_out_of_memory(err):
            raise
        oom = f"{type(err).__name__}: {err}"
    built = fn = None  # drop the contender (weights, optimizer state) before the next one
    free_memory()
    if oom is not None:
        record.out_of_memory(group=group, impl=impl, params=params, error=oom)
        pytest.skip(f"{impl} runs out of memory at {params}")
    record.time(group=group, impl=impl, params=params, seconds=seconds, notes=text)
    if memory and peak is not None:
        record.figure(group=group, impl=impl, params=params, metric="peak_memory", value=peak - base,
                      unit="bytes", notes="peak in one step beyond what was in use before the contender "
                      "was built" + ("" if IS_CUDA else " (resident set)"))


# ----------------------------------------------------------------------------------------------
# The results file
# ----------------------------------------------------------------------------------------------

def device_name() -> str:
    if IS_CUDA:
        return torch.cuda.get_device_name(torch.device(DEVICE))
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60]


def _git_commit() -> Dict[str, object]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=BENCH_DIR,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return {"commit": head or None, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _versions() -> Dict[str, Optional[str]]:
    from importlib import metadata
    out: Dict[str, Optional[str]] = {"python": platform.python_version(), "torch": torch.__version__,
                                     "saefast": saefast.__version__}
    for dist in ("triton", "pytest-benchmark", "eai-sparsify", "sae-lens", "dictionary-learning"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def derived_figures(figures: List[dict]) -> List[dict]:
    """Speed-up of saefast over every other contender timed on the same point, and each step's
    time as a multiple of the floor (encoder GEMM + one Adam pass) at that point."""
    out = []
    by_point: Dict[Tuple, Dict[str, dict]] = {}
    for f in figures:
        if f["metric"] == "time" and f["value"] is not None:
            by_point.setdefault(_key(f["group"], f["params"]), {})[f["impl"]] = f
    for point in by_point.values():
        mine = point.get("saefast")
        if mine is None or any(f.get("interleaved") for f in point.values()):
            continue  # interleaved points record their own per-round ratios
        for impl, f in point.items():
            if impl == "saefast" or impl.startswith("floor"):
                continue
            out.append({"group": f["group"], "impl": impl, "params": f["params"],
                        "metric": "saefast_speedup", "value": f["value"] / mine["value"], "unit": "x",
                        "notes": f"time of {impl} / time of saefast"})
        floor = [point.get("floor-gemm"), point.get("floor-adam")]
        if all(floor):
            floor_s = floor[0]["value"] + floor[1]["value"]
            for impl, f in point.items():
                if impl.startswith("floor"):
                    continue
                out.append({"group": f["group"], "impl": impl, "params": f["params"],
                            "metric": "multiple_of_floor", "value": f["value"] / floor_s, "unit": "x",
                            "notes": "step time / (encoder GEMM + one Adam pass)"})
    return out


def pytest_sessionstart(session):
    _SESSION["started"] = datetime.datetime.now(datetime.timezone.utc)
    _SESSION["loadavg_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    path = config.getoption("--results-path")
    if not (path or config.getoption("--save-results")) or not _FIGURES:
        return
    started = _SESSION.get("started") or datetime.datetime.now(datetime.timezone.utc)
    name = device_name()
    if path is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        tag = _slug(config.getoption("--results-tag"))
        stem = f"{started:%Y-%m-%d}-{_slug(name)}" + (f"-{tag}" if tag else "")
        path = RESULTS_DIR / f"{stem}.json"
        if path.exists():
            path = RESULTS_DIR / f"{stem}-{started:%H%M%S}.json"
    device = {"type": "cuda" if IS_CUDA else "cpu", "name": name, "cpu_count": os.cpu_count(),
              "torch_threads": torch.get_num_threads(),
              "omp_wait_policy": ("unknown (torch was loaded before the benchmarks' conftest)" if _TORCH_PRELOADED
                                  else os.environ.get("OMP_WAIT_POLICY", "default (unset)")
                                  + ("" if _OMP_POLICY_PRESET or "OMP_WAIT_POLICY" not in os.environ
                                     else " (set by conftest)"))}
    if IS_CUDA:
        device["total_memory_bytes"] = torch.cuda.get_device_properties(torch.device(DEVICE)).total_memory
    else:
        device["total_memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    doc = {
        "schema": 1,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "backend": backend_name(torch.device(DEVICE)),
        "versions": _versions(),
        "git": _git_commit(),
        "loadavg_start": _SESSION.get("loadavg_start"),
        "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "profile": {k: (v if not isinstance(v, tuple) else list(v)) for k, v in dataclasses.asdict(SIZES).items()
                    if k != "dtypes"} | {"dtypes": [dtype_name(d) for d in SIZES.dtypes]},
        "pytest_exitstatus": int(exitstatus),
        "figures": _FIGURES + derived_figures(_FIGURES),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"saefast benchmark results: {path}")
