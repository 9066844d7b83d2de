"""The ``saefast`` command: ``train``, ``eval``, ``cache`` and ``analyze``.

``saefast train`` with no model, dataset or cache trains on the embedded synthetic default (a
planted dictionary; no network) and reports how well the planted features were recovered.
Every option of :class:`saefast.training.TrainConfig` is a flag (``--lr-warmup-steps 500``) and
can also come from ``--config run.yaml`` (flags win). Under ``torchrun`` the run is data-parallel.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import re
import sys
import typing
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from .training.config import SYNTHETIC_ARCHITECTURE_DEFAULTS, SYNTHETIC_DEFAULTS, TrainConfig, load_config_file
from .utils import DiskFullError, is_disk_full

__all__ = ["main", "build_parser"]

log = logging.getLogger("saefast")

# Flags that may be repeated: once fills the field, several times its plural list field.
_REPEATABLE = {"hook": "hooks", "target_hook": "target_hooks"}

_GROUP_TITLES = {
    "sae": "SAE", "optim": "optimisation", "run": "run folder, checkpoints and logging",
    "data": "activation source (model + dataset, or cache)", "synthetic": "embedded synthetic default",
    "evals": "model evals", "e2e": "end-to-end losses",
}


def _unwrap_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp


def _add_config_options(parser: argparse.ArgumentParser, only_groups: Optional[Sequence[str]] = None) -> None:
    """One flag per TrainConfig field, help from the field's metadata; absent flags stay absent."""
    hints = typing.get_type_hints(TrainConfig)
    groups: Dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        group_key = f.metadata["group"]
        if only_groups is not None and group_key not in only_groups:
            continue
        if group_key not in groups:
            groups[group_key] = parser.add_argument_group(_GROUP_TITLES[group_key])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default})"
        flag = "--" + f.name.replace("_", "-")
        tp = _unwrap_optional(hints[f.name])
        kwargs: Dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if f.name in _REPEATABLE:
            kwargs.update(action="append", metavar=tp.__name__.upper())
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, List):
            kwargs.update(nargs="*", type=typing.get_args(tp)[0], metavar="X")
        else:
            kwargs.update(type=tp, metavar=tp.__name__.upper())
        groups[group_key].add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saefast", description="Train and evaluate sparse autoencoders.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train an SAE",
        description="Train an SAE. With no --model/--dataset/--cache-dir it trains on the embedded synthetic "
                    "default (planted dictionary, no network, well under two minutes on a laptop CPU), whose "
                    f"own defaults are {SYNTHETIC_DEFAULTS} (per architecture also {SYNTHETIC_ARCHITECTURE_DEFAULTS}) "
                    "unless given (--total-tokens replaces train_steps, "
                    "--d-sae expansion_factor). Options may also come from --config FILE (YAML or JSON); flags "
                    "override the file. An option that would have no effect on the run (another source's, "
                    "another architecture's) is refused with the reason. Launch under torchrun for "
                    "data-parallel training.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (same names as the flags, "
                                                        "with underscores).")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint "
                                                           "(its config.json is used; other flags must agree).")
    _add_config_options(train)

    ev = sub.add_parser("eval", help="evaluate a trained run and save eval.json",
                        description="Evaluate RUN_DIR/sae on the run's held-out activations (MSE, explained "
                                    "variance, cosine similarity, L0, dead/dense latents; CE loss, CE recovered and "
                                    "KL with the SAE spliced in for model runs; planted-feature recovery for "
                                    "synthetic runs). Prints the metrics and writes RUN_DIR/eval.json.")
    ev.add_argument("run_dir", metavar="RUN_DIR")
    ev.add_argument("--batches", type=int, default=None, help="held-out batches to use (default: the run's eval_batches)")
    ev.add_argument("--device", default=None, help="device (default: cuda if available)")
    ev.add_argument("--output", default=None, help="where to write the metrics (default: RUN_DIR/eval.json)")

    cache = sub.add_parser("cache", help="cache model activations to safetensors shards",
                           description="Run a model over a dataset once and write its activations at --hook to "
                                       "safetensors shards in --out; train from them with --cache-dir.")
    cache.add_argument("--out", required=True, metavar="DIR", help="output folder for the shards and manifest")
    cache.add_argument("--n-tokens", type=int, required=True, help="activations (tokens) to write")
    cache.add_argument("--shard-tokens", type=int, default=262144, help="activations per shard")
    cache.add_argument("--config", metavar="FILE", help="YAML or JSON file of options")
    _add_config_options(cache, only_groups=("data",))
    cache.add_argument("--batch-size", dest="batch_size", type=int, default=argparse.SUPPRESS,
                       help="activations per batch drawn from the source")
    cache.add_argument("--device", dest="device", default=argparse.SUPPRESS, help="device for the model")
    cache.add_argument("--seed", dest="seed", type=int, default=argparse.SUPPRESS, help="shuffle seed")
    _add_analyze_parser(sub)
    return parser


def _add_analyze_parser(sub: Any) -> None:
    an = sub.add_parser("analyze", help="analyse a trained SAE: activation database, report, pictures",
                        description="Analyse the SAE of RUN_DIR (saefast train) or of an SAE folder: build a sparse "
                                    "activation database, sparsity / dead-feature report, reconstruction metrics, CE "
                                    "loss recovered and per-feature ablation (model sources), decoder similarity, "
                                    "feature-density histogram, training curves and an HTML report with a page per "
                                    "feature. Activations come from --model/--dataset/--hook or --cache-dir, else "
                                    "from the run's own source.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    an.add_argument("path", metavar="RUN_DIR_OR_SAE_DIR")
    an.add_argument("--model", default=None, help="transformer-lens model (default: the run's / SAE's)")
    an.add_argument("--dataset", default=None, help="dataset name or local file/folder (default: the run's)")
    an.add_argument("--hook", default=None, help="hook the SAE reads (default: the SAE's hook_spec)")
    an.add_argument("--cache-dir", default=None, help="analyse on this activation cache instead of a model")
    an.add_argument("--n-tokens", type=int, default=32768, help="tokens in the activation database")
    an.add_argument("--features", type=int, default=50, help="features that get an HTML page (spread over the "
                                                             "density ranking)")
    an.add_argument("--out", default=None, help="output folder (default: RUN_DIR/analysis)")
    an.add_argument("--context-size", type=int, default=None, help="tokens per window for a model source")
    an.add_argument("--batch-size", type=int, default=8, help="windows per model forward pass")
    an.add_argument("--device", default=None, help="device (default: cuda if available)")
    an.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


_NOT_CONFIG = ("command", "config", "resume", "run_dir", "batches", "output", "out", "n_tokens", "shard_tokens")


def _config_from_args(args: argparse.Namespace, saved: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """The run's options: defaults (or, on --resume, the run's ``saved`` config.json) < --config
    file < flags."""
    flags = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    for single, plural in _REPEATABLE.items():
        given = flags.pop(single, None)
        if given is None:
            continue
        if len(given) == 1:
            flags[single] = given[0]
        elif plural in flags:
            raise ValueError(f"--{single.replace('_', '-')} was repeated and --{plural.replace('_', '-')} given too; "
                             "use one of them")
        else:
            flags[plural] = given
    values: Dict[str, Any] = {}
    resume = getattr(args, "resume", None)
    if resume:
        if saved is None:
            saved = _read_resumed_config(resume)
        values.update(saved)
    if args.config:
        values.update(load_config_file(args.config))
    values.update(flags)
    if resume:
        values["out_dir"], values["run_name"] = str(Path(resume).parent), Path(resume).name
        return TrainConfig.from_dict(values)
    return TrainConfig.with_defaults_for_source(values)


def _read_resumed_config(run_dir: str) -> Dict[str, Any]:
    from .training.run_folder import read_run_config
    try:
        return read_run_config(run_dir)
    except ValueError as err:
        raise ValueError(f"--resume {run_dir}: {err}") from None


def _natural_key(name: str) -> List[Any]:
    """Sort key putting ``prefix_64`` before ``prefix_256``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _format_metrics(metrics: Dict[str, Any]) -> str:
    order = ["feature_recovery", "mse", "explained_variance", "cosine_similarity", "l0", "dead_fraction",
             "inactive_fraction", "dense_fraction", "ce_clean", "ce_spliced", "ce_zero_ablation", "ce_loss_recovered",
             "kl"]
    keys = [k for k in order if k in metrics] + sorted((k for k in metrics if k not in order), key=_natural_key)
    return "\n".join(f"  {k:<20} {v:.6g}" if isinstance(v, float) else f"  {k:<20} {v}" for k in keys
                     for v in [metrics[k]])


def _cmd_train(args: argparse.Namespace) -> int:
    from .training.distributed import init_distributed, resolve_device
    from .training.run_folder import RunFolder

    resume = bool(args.resume)
    saved = _read_resumed_config(args.resume) if resume else None  # the run's config.json, read once
    cfg = _config_from_args(args, saved)
    info = init_distributed(cfg.device)
    run = RunFolder.prepare(cfg, resume, saved=saved)  # before the model or data are loaded
    device = resolve_device(cfg.device, info)
    with _cpu_threads(cfg.cpu_threads if device.type == "cpu" else None):
        return _run_training(cfg, run, device, info)


@contextlib.contextmanager
def _cpu_threads(n: Optional[int]) -> Iterator[None]:
    """torch.set_num_threads(n) for the duration (restored after, e.g. when main() runs in-process)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_training(cfg: TrainConfig, run: Any, device: Any, info: Any) -> int:
    from .training.build import build_members, build_sae
    from .training.trainer import Trainer, TrainingDiverged

    members = build_members(cfg, device, info)
    try:
        trainers = [Trainer(build_sae(sub, inputs.d_in, device, **inputs.sae_shape()), inputs.source, sub,
                            resume=run.resume, run=None if cfg.is_multi else run, **inputs.trainer_kwargs())
                    for sub, inputs in members]
        if cfg.is_multi:
            from .training.multi import MultiTrainer
            multi = MultiTrainer(trainers, run, resume=run.resume)
            all_metrics = multi.train()
        else:
            metrics = trainers[0].train()
    except TrainingDiverged as err:
        print(f"saefast train: {err}", file=sys.stderr)
        return 1
    finally:
        for _, inputs in members:
            inputs.close()
    if cfg.is_multi:
        if info.is_main:
            t0 = trainers[0]
            lines = [f"saefast: trained {len(trainers)} SAEs from one model pass, {t0.step} steps "
                     f"({t0.tokens_seen:,} tokens) each; run folders under {run.path}:"]
            for t in trainers:
                m = all_metrics[t.cfg.run_name]
                shown = ", ".join(f"{k}={m[k]:.4g}" for k in ("explained_variance", "l0", "ce_loss_recovered", "kl")
                                  if isinstance(m.get(k), float))
                lines.append(f"  {t.cfg.run_name}: {shown}")
            lines.append(f"browse one with: saefast analyze {run.path / trainers[0].cfg.run_name}")
            print("\n".join(lines))
        return 0
    trainer = trainers[0]
    if info.is_main:
        head = f"saefast: trained {trainer.step} steps ({trainer.tokens_seen:,} tokens); SAE saved to {run.sae_dir}"
        if trainer.curves is not None:
            head += f"\ntraining curves: {trainer.curves}; browse the features with: saefast analyze {run.path}"
        if "feature_recovery" in metrics:
            head += ("\nplanted-feature recovery (mean over planted features of the max cosine similarity "
                     "with a decoder row) next to reconstruction metrics on held-out activations:")
        print(head + "\n" + _format_metrics(metrics) + _dead_note(cfg, trainer.sae, metrics))
    return 0


def _dead_note(cfg: Any, sae: Any, metrics: Dict[str, Any]) -> str:
    """What dead_fraction counts, and on the synthetic default why about half the latents are dead."""
    if "dead_fraction" not in metrics:
        return ""
    n_dead = round(metrics["dead_fraction"] * sae.d_sae)
    note = (f"\ndead: {n_dead} of {sae.d_sae} latents have not fired in the last {sae.config.n_batches_to_dead} "
            "training steps (n_batches_to_dead); inactive_fraction counts the latents that fired on none of the "
            "held-out rows")
    if cfg.source_kind == "synthetic" and sae.d_sae > cfg.synthetic_features:
        note += (f"\nthe synthetic data has {cfg.synthetic_features} planted features for {sae.d_sae} latents: the "
                 f"other {sae.d_sae - cfg.synthetic_features} latents have no feature to learn and die as training "
                 f"goes on, so up to {1 - cfg.synthetic_features / sae.d_sae:.0%} dead is expected "
                 "(--expansion-factor sets d_sae)")
    return note


def _cmd_eval(args: argparse.Namespace) -> int:
    from .training.evaluate import evaluate_run

    metrics = evaluate_run(args.run_dir, device=args.device, n_batches=args.batches, output=args.output)
    if metrics and all(isinstance(v, dict) for v in metrics.values()):  # a run of several hooks
        print("\n".join(f"saefast eval {args.run_dir} / {name}:\n" + _format_metrics(m) for name, m in metrics.items()))
        return 0
    print(f"saefast eval {args.run_dir}:\n" + _format_metrics(metrics))
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from .data.cache import cache_activations
    from .training.build import build_model_source
    from .training.distributed import resolve_device

    cfg = _config_from_args(args)
    if cfg.source_kind != "model":
        raise ValueError("saefast cache needs --model, --hook and --dataset")
    source, hooks = build_model_source(cfg, resolve_device(cfg.device))
    hook_meta = {"hook": hooks[0]} if len(hooks) == 1 else {"hooks": hooks}
    try:
        cache_activations(source, args.out, args.n_tokens, args.shard_tokens,
                          metadata={"model": cfg.model, **hook_meta, "dataset": cfg.dataset,
                                    "context_size": cfg.context_size, "prepend_bos": cfg.prepend_bos})
    finally:
        source.close()
    print(f"saefast cache: wrote {args.n_tokens:,} activations of {', '.join(hooks)} to {args.out}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis.run import analyze
    from .training.distributed import resolve_device

    device = str(resolve_device(args.device)) if args.device is not None else None  # checked before any work
    summary = analyze(args.path, args.out, model=args.model, dataset=args.dataset, hook=args.hook,
                      cache_dir=args.cache_dir, n_tokens=args.n_tokens, n_features=args.features,
                      device=device, context_size=args.context_size, batch_size=args.batch_size,
                      overwrite=args.overwrite)
    print(f"saefast analyze: wrote {summary['out_dir']} (open index.html)")
    return 0


def _one_line(err: BaseException) -> str:
    """The error as one line: its message with line breaks folded, or for a bare OS error its
    description and the file it concerns."""
    if isinstance(err, OSError) and not isinstance(err, DiskFullError) and err.filename is not None \
            and err.strerror:
        return f"{err.strerror}: {err.filename}"
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``saefast`` console script. Bad input (a flag, a config file, a path)
    ends with a one-line error and exit code 2; a full disk with one line naming the file being
    written and the last complete checkpoint, and exit code 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    commands = {"train": _cmd_train, "eval": _cmd_eval, "cache": _cmd_cache, "analyze": _cmd_analyze}
    try:
        return commands[args.command](args)
    except DiskFullError as err:
        print(f"saefast {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except OSError as err:
        if is_disk_full(err):
            print(f"saefast {args.command}: error: no space left on device"
                  + (f" while writing {err.filename}" if err.filename else ""), file=sys.stderr)
            return 1
        print(f"saefast {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as err:
        print(f"saefast {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if not is_disk_full(err):  # a bug: its traceback is what helps
            raise
        print(f"saefast {args.command}: error: no space left on device ({_one_line(err)[:200]})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
