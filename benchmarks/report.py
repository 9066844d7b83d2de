"""Turn recorded benchmark results into the README's performance section and a plot.

    python benchmarks/report.py [RESULTS.json ...] [--readme README.md] [--plot PATH] [--check]

With no files named, uses the latest results file of each device kind (CUDA, CPU) under
benchmarks/results/ for the main tables, and for each group of :data:`VARIANT_GROUPS` (the SAE
variants' steps, benchmarked on their own and recorded in benchmarks/results/variants/) the latest
file holding that group. Rewrites only the lines between ``<!-- perf-table:start -->`` and
``<!-- perf-table:end -->`` in the README and writes ``benchmarks/results/perf.png`` (step time
and peak memory against d_sae, step time against k: saefast, dense PyTorch and the peers).
Every number comes from a results file; nothing is estimated.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from readme_blocks import fill_block

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
IMPL_ORDER = ("saefast", "saefast-sae", "saefast-classic", "saefast-dict", "sparsify", "sae-lens",
              "dictionary-learning", "dense", "saefast-torch",
              "saefast-fused", "floor-gemm", "floor-adam")
# Groups benchmarked on their own (bench_matryoshka.py, bench_transcoder.py, ...; results in
# results/variants/): each gets a table from the newest results file holding it, so recording
# them never hides the main tables' results.
VARIANTS_DIR = RESULTS_DIR / "variants"
VARIANT_GROUPS = {
    "matryoshka_step": "Whole training step of Matryoshka BatchTopK",
    "jumprelu_step": "Whole training step of JumpReLU",
    "transcoder_step": "Whole training step of a BatchTopK skip transcoder (d_out = d_in)",
    "crosscoder_step": "Whole training step of an acausal crosscoder",
    "multihook_source": "Activations of several hooks for one SAE each: one model pass against one pass per hook",
}
COLORS = {"saefast": "tab:blue", "saefast-sae": "tab:cyan", "saefast-classic": "tab:olive", "dense": "tab:red",
          "sparsify": "tab:green",
          "sae-lens": "tab:purple", "dictionary-learning": "tab:brown", "floor-gemm": "tab:gray"}


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def load(path: Path) -> dict:
    doc = json.loads(path.read_text(encoding="utf-8"))
    if "figures" not in doc or "device" not in doc:
        raise ValueError(f"{path} is not a saefast benchmark results file (no 'figures'/'device')")
    doc["_path"] = path
    return doc


def merge(docs: List[dict]) -> dict:
    """One device's results from several files (a suite run in parts): the newest file's
    header, everyone's figures (a later file's figure replaces an earlier one of the same test)."""
    docs = sorted(docs, key=lambda d: d["started"])
    merged = dict(docs[-1])
    seen: Dict[Tuple, dict] = {}
    for doc in docs:
        for f in doc["figures"]:
            seen[(f.get("test"), f["group"], f["impl"], f.get("saefast_impl"), f["metric"],
                  json.dumps(f["params"], sort_keys=True))] = f
    merged["figures"] = list(seen.values())
    merged["_paths"] = [d["_path"] for d in docs]
    return merged


def by_device(docs: List[dict]) -> List[dict]:
    """Group results by device kind (CUDA first) and merge each group."""
    groups: Dict[str, List[dict]] = defaultdict(list)
    for doc in docs:
        groups[doc["device"]["type"]].append(doc)
    return [merge(groups[k]) for k in ("cuda", "cpu") if k in groups]


def _all_results(results_dir: Path) -> List[dict]:
    docs = []
    paths = sorted(results_dir.glob("*.json"))
    if results_dir == RESULTS_DIR:
        paths += sorted(VARIANTS_DIR.glob("*.json"))
    for path in paths:
        try:
            docs.append(load(path))
        except (ValueError, json.JSONDecodeError):
            continue
    return docs


def latest_per_device(results_dir: Path = RESULTS_DIR,
                      holds: Callable[[str], bool] = lambda group: group not in VARIANT_GROUPS) -> List[dict]:
    """For each device kind the newest results file holding a figure of a group ``holds``
    accepts (default: the main tables' groups), merged with the other files of the same device,
    commit and day (the parts of one suite run)."""
    docs = [d for d in _all_results(results_dir) if any(holds(f["group"]) for f in d["figures"])]
    chosen = []
    for kind in ("cuda", "cpu"):
        mine = [d for d in docs if d["device"]["type"] == kind]
        if not mine:
            continue
        newest = max(mine, key=lambda d: d["started"])
        chosen += [d for d in mine if d["device"]["name"] == newest["device"]["name"]
                   and d.get("git", {}).get("commit") == newest.get("git", {}).get("commit")
                   and d["started"][:10] == newest["started"][:10]]
    return by_device(chosen)


def figures(doc: dict, group: str, metric: str = "time") -> List[dict]:
    return [f for f in doc["figures"] if f["group"] == group and f["metric"] == metric]


def _order(impl: str) -> int:
    return IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER)


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------

def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "out of memory"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "–"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.0f} MiB"


def fmt_x(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}×"


def fmt_speedup(ratio: Optional[float]) -> str:
    """saefast's speed relative to a baseline (baseline time / saefast time)."""
    if ratio is None:
        return "–"
    if abs(ratio - 1) < 0.02:
        return f"as fast ({ratio:.2f}×)"
    return f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower"


def _same_point(a: dict, b: dict) -> bool:
    return a["group"] == b["group"] and a["params"] == b["params"]


def _lookup(doc: dict, fig: dict, metric: str, impl: Optional[str] = None) -> Optional[dict]:
    impl = impl or fig["impl"]
    for f in doc["figures"]:
        if f["metric"] == metric and f["impl"] == impl and _same_point(f, fig):
            return f
    return None


def _shape(params: dict) -> str:
    return (f"d_in {params['d_in']}, d_sae {params['d_sae']}, batch {params['batch']}, k {params['k']}, "
            f"k_aux {params['k_aux']}, {params['dtype']}")


def header(doc: dict) -> str:
    v, dev, git = doc["versions"], doc["device"], doc.get("git", {})
    commit = (git.get("commit") or "unknown")[:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    triton = f", triton {v['triton']}" if v.get("triton") else ""
    load = doc.get("loadavg_start")
    load_txt = f", load average {load[0]:.1f} at start" if load else ""
    return (f"{doc['started'][:10]}, {dev.get('cpu_count')} CPU cores, {dev.get('torch_threads')} torch threads"
            f"{load_txt}, torch {v['torch']}{triton}, commit {commit}")


def fmt_range(fig: Optional[dict], fmt) -> str:
    """``median (min–max)`` of an interleaved figure, or its value alone."""
    if fig is None:
        return "–"
    if fig.get("min") is None or fig.get("max") is None:
        return fmt(fig["value"])
    return f"{fmt(fig['value'])} ({fmt(fig['min'])}–{fmt(fig['max'])})"


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}×"


def interleaved_step_table(doc: dict, rows: List[dict]) -> List[str]:
    """Per dtype and fraction of dead latents: every contender's step (median and range over the
    rounds), its multiple of the floor, its peak memory; then each saefast way's speed-up over
    each baseline as per-round ratios, called a win only when the range excludes 1."""
    lines = []
    points: Dict[Tuple, List[dict]] = defaultdict(list)
    for f in rows:
        points[(f["params"]["dtype"], f["params"].get("dead_fraction", 0.0))].append(f)
    for (dtype, dead), sub in sorted(points.items()):
        sub = sorted(sub, key=lambda f: _order(f["impl"]))
        rounds = max((f.get("rounds") or 0) for f in sub)
        lines += ["", f"Whole BatchTopK training step, {_shape(sub[0]['params'])}, {100 * dead:.0f} % of the latents "
                  f"dead (the same for every contender), {rounds} interleaved rounds; median (min–max):", "",
                  "| contender | step | × floor | peak memory | configuration |", "|---|---|---|---|---|"]
        for f in sub:
            floor = _lookup(doc, f, "multiple_of_floor")
            mem = _lookup(doc, f, "peak_memory")
            lines.append(f"| {f['impl']} | {fmt_range(f, fmt_time)} | {fmt_range(floor, _fmt_ratio)} | "
                         f"{fmt_bytes(mem['value'] if mem else None)} | {f.get('notes', '')} |")
        speedups = [g for g in doc["figures"] if g["metric"] == "saefast_speedup" and g.get("interleaved")
                    and _same_point(g, sub[0])]
        baselines = sorted({g["impl"] for g in speedups}, key=_order)
        ways = sorted({g["saefast_impl"] for g in speedups}, key=_order)
        if not speedups:
            continue
        lines += ["", "saefast's speed-up (baseline time / saefast time, per round; median (min–max); a win only "
                  "when every round agrees):", "",
                  "| saefast way | " + " | ".join(f"vs {b}" for b in baselines) + " |",
                  "|---|" + "---|" * len(baselines)]
        for way in ways:
            cells = []
            for b in baselines:
                g = next((g for g in speedups if g["saefast_impl"] == way and g["impl"] == b), None)
                cells.append("–" if g is None else f"{fmt_range(g, _fmt_ratio)} {g.get('verdict', '')}")
            lines.append(f"| {way} | " + " | ".join(cells) + " |")
    return lines


def step_table(doc: dict) -> List[str]:
    rows = figures(doc, "train_step")
    if not rows:
        return []
    if any(f.get("interleaved") for f in rows):
        return interleaved_step_table(doc, [f for f in rows if f.get("interleaved")])
    lines = []
    for dtype in sorted({f["params"]["dtype"] for f in rows}):
        sub = sorted((f for f in rows if f["params"]["dtype"] == dtype), key=lambda f: _order(f["impl"]))
        lines += ["", f"Whole BatchTopK training step, {_shape(sub[0]['params'])}:", "",
                  "| contender | step | saefast is | × floor | peak memory | configuration |",
                  "|---|---|---|---|---|---|"]
        for f in sub:
            speed = _lookup(doc, f, "saefast_speedup")
            floor = _lookup(doc, f, "multiple_of_floor")
            mem = _lookup(doc, f, "peak_memory")
            speed_txt = "–" if f["impl"].startswith(("saefast", "floor")) else fmt_speedup(
                speed["value"] if speed else None)
            lines.append(f"| {f['impl']} | {fmt_time(f['value'])} | {speed_txt} | "
                         f"{fmt_x(floor['value'] if floor else None)} | {fmt_bytes(mem['value'] if mem else None)} | "
                         f"{f.get('notes', '')} |")
    return lines


def largest_table(doc: dict) -> List[str]:
    rows = sorted(figures(doc, "largest_d_sae", "max_d_sae"), key=lambda f: _order(f["impl"]))
    if not rows:
        return []
    p = rows[0]["params"]
    budget = rows[0].get("budget_bytes")
    lines = ["", f"Largest d_sae that trains (d_in {p['d_in']}, batch {p['batch']}, k {p['k']}, {p['dtype']}; "
                 f"budget {fmt_bytes(budget)}, {rows[0].get('budget_kind', '')}; bound = weights + gradients + "
                 f"Adam state):", "", "| contender | largest d_sae | bound | fraction of bound |", "|---|---|---|---|"]
    for f in rows:
        frac = f.get("fraction_of_bound")
        lines.append(f"| {f['impl']} | {f['value']:,}{'' if f.get('search_complete', True) else ' (at least)'} | "
                     f"{f.get('bound_d_sae') or 0:,} | {'–' if frac is None else f'{frac:.2f}'} |")
    return lines


def ops_table(doc: dict) -> List[str]:
    groups = ("topk_encode", "sparse_decode", "auxk", "decoder_norm")
    rows = [f for g in groups for f in figures(doc, g)]
    if not rows:
        return []
    points: Dict[Tuple, Dict[str, dict]] = defaultdict(dict)
    for f in rows:
        p = f["params"]
        label = f["group"] + "".join(f" {p[k]}" for k in ("mode", "pass") if k in p)
        points[(label, p["dtype"])][f["impl"]] = f
    lines = ["", f"Single ops at {_shape(rows[0]['params']).rsplit(',', 1)[0]}:", "",
             "| op | dtype | saefast | saefast torch backend | dense PyTorch | saefast vs dense |", "|---|---|---|---|---|---|"]
    for (label, dtype), by_impl in points.items():
        mine = by_impl.get("saefast") or by_impl.get("saefast-fused")
        dense = by_impl.get("dense")
        ref = by_impl.get("saefast-torch", by_impl.get("reference"))  # older results files say "reference"
        ratio = (dense["value"] / mine["value"]) if (mine and dense and mine["value"] and dense["value"]) else None
        lines.append(f"| {label} | {dtype} | {fmt_time(mine['value']) if mine else '–'} | "
                     f"{fmt_time(ref['value']) if ref else 'same code'} | {fmt_time(dense['value']) if dense else '–'} | "
                     f"{fmt_speedup(ratio)} |")
    return lines


def variant_table(doc: dict, group: str) -> List[str]:
    """One of VARIANT_GROUPS: time, saefast's speed-up, peak memory and configuration per
    contender, one table per point (shapes and options) of the group."""
    points: Dict[str, List[dict]] = defaultdict(list)
    for f in figures(doc, group):
        points[json.dumps(f["params"], sort_keys=True)].append(f)
    lines: List[str] = []
    for rows in points.values():
        rows = sorted(rows, key=lambda f: _order(f["impl"]))
        shape = ", ".join(f"{k} {v}" for k, v in rows[0]["params"].items() if k != "device")
        lines += ["", f"{VARIANT_GROUPS[group]} ({shape}); {header(doc)}; from "
                      f"{', '.join(f'`{_rel(p)}`' for p in doc['_paths'])}:", "",
                  "| contender | time | saefast is | peak memory | configuration |", "|---|---|---|---|---|"]
        for f in rows:
            speed = _lookup(doc, f, "saefast_speedup")
            mem = _lookup(doc, f, "peak_memory")
            speed_txt = "–" if f["impl"].startswith("saefast") else fmt_speedup(speed["value"] if speed else None)
            lines.append(f"| {f['impl']} | {fmt_time(f['value'])} | {speed_txt} | "
                         f"{fmt_bytes(mem['value'] if mem else None)} | {f.get('notes', '')} |")
    return lines


def variant_sections(results_dir: Path = RESULTS_DIR) -> List[str]:
    """The VARIANT_GROUPS tables, per device kind, each from the newest file holding its group."""
    lines: List[str] = []
    for group in VARIANT_GROUPS:
        for doc in latest_per_device(results_dir, holds=lambda g, group=group: g == group):
            if not lines:
                lines += ["", "### SAE variants and several hooks"]
            lines += variant_table(doc, group)
    return lines


def gpu_check_sections(results_dir: Path = RESULTS_DIR) -> List[str]:
    """The newest recorded GPU check (``results/gpu-check-*/check.json``, written by
    ``benchmarks/gpu_check.sh``): its measured step beside the model's prediction for that device,
    each labelled, through ``gpu_check.summarize``. Empty when no GPU check is recorded."""
    checks = sorted(results_dir.glob("gpu-check-*/check.json"))
    if not checks:
        return []
    sys.path.insert(0, str(BENCH_DIR))
    import gpu_check
    newest = checks[-1]
    summary = gpu_check.summarize(json.loads(newest.read_text(encoding="utf-8"))).splitlines()
    # the summary's indented lines (stages, paths, floor multiples) become list items
    lines = [f"- {line.strip()}" if line.startswith("  ") else line for line in summary]
    return ["", "### GPU check: measured beside the model's prediction", "",
            f"From `{_rel(newest)}` (`python benchmarks/gpu_check.py --summarize` prints the same); predictions "
            "come from `benchmarks/perf_model.py` and are labelled so.", "", *lines]


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return (path.relative_to(ROOT) if path.is_relative_to(ROOT) else path).as_posix()


def section(docs: List[dict], plot: Optional[Path], variants: Optional[List[str]] = None) -> str:
    if not docs:
        return ("(no results recorded yet: run `python -m pytest benchmarks/ --benchmark-only --save-results` "
                "then `python benchmarks/report.py`)")
    lines = ["Measured by `python -m pytest benchmarks/ --benchmark-only --save-results`; tables and plot "
             "written by `python benchmarks/report.py` from the results files named below (medians, and for "
             "the interleaved whole-step figures their range over the rounds; the floor is the encoder GEMM "
             "alone plus one Adam pass). See docs/benchmarks.md."]
    for doc in docs:
        sources = ", ".join(f"`{_rel(p)}`" for p in doc["_paths"])
        lines += ["", f"### {doc['device']['type'].upper()}: {doc['device']['name']}", "",
                  f"{header(doc)}; from {sources}"]
        lines += step_table(doc) + largest_table(doc) + ops_table(doc)
    if plot is not None:
        lines += ["", f"![step time and peak memory against d_sae and k]({_rel(plot)})"]
    lines += variants or []
    return "\n".join(lines)


def write_readme(readme: Path, text: str) -> None:
    fill_block(readme, START, END, text)


# ----------------------------------------------------------------------------------------------
# The plot
# ----------------------------------------------------------------------------------------------

def _series(doc: dict, group: str, metric: str, x_key: str, dtype: str) -> Dict[str, List[Tuple[float, float]]]:
    out: Dict[str, List[Tuple[float, float]]] = defaultdict(list)
    for f in figures(doc, group, metric):
        if f["params"]["dtype"] == dtype and f["value"] is not None:
            out[f["impl"]].append((f["params"][x_key], f["value"]))
    return {impl: sorted(points) for impl, points in out.items()}


def plot(docs: List[dict], path: Path) -> Optional[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for doc in docs:
        dtypes = sorted({f["params"]["dtype"] for f in figures(doc, "scaling_d_sae")})
        rows += [(doc, dtype) for dtype in dtypes]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 3, figsize=(15, 4.2 * len(rows)), squeeze=False)
    panels = (("scaling_d_sae", "time", "d_sae", "step time (s)"),
              ("scaling_d_sae", "peak_memory", "d_sae", "peak memory per step (GiB)"),
              ("scaling_k", "time", "k", "step time (s)"))
    for (doc, dtype), ax_row in zip(rows, axes):
        for ax, (group, metric, x_key, ylabel) in zip(ax_row, panels):
            series = _series(doc, group, metric, x_key, dtype)
            for impl in sorted(series, key=_order):
                xs, ys = zip(*series[impl])
                if metric == "peak_memory":
                    ys = [y / (1 << 30) for y in ys]
                ax.plot(xs, ys, marker="o", label=impl, color=COLORS.get(impl),
                        linestyle="--" if impl.startswith("floor") else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(x_key)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if series:
                ax.legend(fontsize=8)
            p0 = next(iter(figures(doc, group)), {"params": {}})["params"]
            fixed = f"k {p0.get('k')}" if x_key == "d_sae" else f"d_sae {p0.get('d_sae')}"
            ax.set_title(f"{doc['device']['name'][:40]}, {dtype}\n{doc['started'][:10]}, d_in {p0.get('d_in')}, "
                         f"batch {p0.get('batch')}, {fixed}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[Iterable[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Write the README performance section and plot from results files.")
    ap.add_argument("results", nargs="*", type=Path, help="results files (default: latest per device kind)")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--plot", type=Path, default=RESULTS_DIR / "perf.png")
    ap.add_argument("--print", dest="print_only", action="store_true", help="print the section, write nothing")
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.results:
        named = [load(p) for p in args.results]
        docs = by_device([d for d in named if any(f["group"] not in VARIANT_GROUPS for f in d["figures"])])
        variants = [line for group in VARIANT_GROUPS
                    for doc in by_device([d for d in named if any(f["group"] == group for f in d["figures"])])
                    for line in variant_table(doc, group)]
        variants = (["", "### SAE variants and several hooks"] + variants) if variants else []
    else:
        docs, variants = latest_per_device(), variant_sections()
    variants = gpu_check_sections() + variants
    if args.print_only:
        print(section(docs, None, variants))
        return 0
    plot_path = plot(docs, args.plot) if docs else None
    write_readme(args.readme, section(docs, plot_path, variants))
    print(f"wrote {args.readme}" + (f" and {plot_path}" if plot_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
