"""TrainConfig: every option of a training run, loadable from YAML/JSON and from the command line.

Each field carries its help text in ``metadata["help"]``; ``saefast train --help`` is generated
from these. The run's own options are declared below; the SAE's options are not declared here
but taken from :class:`saefast.config.SAEConfig` and the variants' config classes (the fields
marked ``metadata["train"]``), with their defaults and help, so each is declared once.
Precedence when the CLI builds a config: defaults < config file (``--config run.yaml``) <
command-line flags.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from ..config import (DEFAULT_ARCHITECTURE, SAEConfig, architectures, canonical_architecture, variant_class,
                      variant_classes, variant_options)
from ..utils import parse_hook
from .distributed import parse_device

__all__ = ["TrainConfig", "NORMALIZATIONS", "SYNTHETIC_DEFAULTS", "SYNTHETIC_ARCHITECTURE_DEFAULTS"]

NORMALIZATIONS = ("none", "dataset_scale", "dataset_center_scale")
SYNTHETIC_D_IN = 64      # the synthetic default's input width when d_in is not given

# Transcoder names (SAELens's among them) that --architecture accepts: the activation they train
# with and whether they add the linear skip. A transcoder is an option of every architecture
# (target_hook / d_out); these names set it in one flag.
TRANSCODER_ARCHITECTURES = {"transcoder": ("batchtopk", False), "skip_transcoder": ("batchtopk", True),
                            "jumprelu_transcoder": ("jumprelu", False),
                            "jumprelu_skip_transcoder": ("jumprelu", True)}


def _transcoder_name(architecture: Any) -> Optional[Tuple[str, str, bool]]:
    """(the name as given, normalised; the activation it trains with; whether it adds the skip)
    for one of :data:`TRANSCODER_ARCHITECTURES`, else None."""
    name = str(architecture).strip().lower()
    return (name, *TRANSCODER_ARCHITECTURES[name]) if name in TRANSCODER_ARCHITECTURES else None
_DTYPES = ("float32", "bfloat16", "float16")

# Defaults of the embedded synthetic run (no model, dataset or cache named), beneath the config
# file and the flags: sized to recover the planted dictionary (mean max cosine > 0.99) in well under
# a minute on two CPU cores.
SYNTHETIC_DEFAULTS: Dict[str, Any] = {
    "train_steps": 1500, "batch_size": 1024, "lr": 3e-3, "lr_warmup_steps": 50, "top_k": 4,
    "expansion_factor": 4, "n_batches_to_dead": 50, "checkpoint_every": 500, "log_every": 25, "cpu_threads": 1,
}
# Per-architecture synthetic defaults on top: the L1 coefficient that makes a ReLU SAE sparse on the
# synthetic data (at the general 1e-3 it keeps an L0 of about 66 of 256 latents).
SYNTHETIC_ARCHITECTURE_DEFAULTS: Dict[str, Dict[str, Any]] = {"relu": {"l1_coefficient": 1e-2}}


def _opt(default: Any, help: str, group: str, resume_safe: bool = False, sources: Optional[tuple] = None) -> Any:
    """A dataclass field with its --help text. ``resume_safe`` options may differ on --resume
    because they do not change what is trained (logging, checkpoint cadence). ``sources``: the
    activation sources ("model", "cache", "synthetic") the option acts on; set to anything but its
    default on another source, it is refused rather than ignored."""
    meta = {"help": help, "group": group, "resume_safe": resume_safe, "sources": sources}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class _RunOptions:
    """The options of a training run besides the SAE's own (see :class:`TrainConfig`)."""

    # --- SAE sizing and placement ---------------------------------------------------------------
    d_in: Optional[int] = _opt(None, "Input width. Default: the hook's width for model runs, 64 for the synthetic default; "
                                     "a value that disagrees with the hook is an error.", "sae")
    d_sae: Optional[int] = _opt(None, "Number of latents (dictionary size). Default: expansion_factor * d_in.", "sae")
    expansion_factor: int = _opt(8, "d_sae = expansion_factor * d_in when d_sae is not given (a crosscoder: times "
                                    "one layer's width).", "sae")
    d_out: Optional[int] = _opt(None, "Transcoders: output width. Model and cache runs take it from target_hook (a value "
                                      "that disagrees is an error); on the synthetic default, setting it trains a "
                                      "transcoder on planted (input, target) pairs.", "sae")
    device: Optional[str] = _opt(None, "Device for the SAE and the model (cuda, cuda:1, cpu). Default: cuda if available. "
                                       "Under torchrun each rank uses cuda:<LOCAL_RANK>.", "sae")

    # --- optimisation --------------------------------------------------------------------------
    lr: float = _opt(4e-4, "Peak Adam learning rate.", "optim")
    adam_beta1: float = _opt(0.9, "Adam beta1.", "optim")
    adam_beta2: float = _opt(0.999, "Adam beta2.", "optim")
    adam_eps: float = _opt(1e-8, "Adam epsilon.", "optim")
    lr_warmup_steps: int = _opt(100, "Linear LR warm-up from lr/warmup to lr over this many optimizer steps.", "optim")
    lr_decay_floor: float = _opt(0.1, "Cosine decay after warm-up ends at lr * lr_decay_floor on the last step "
                                      "(0 for a full decay, 1 for a constant LR).", "optim")
    max_grad_norm: float = _opt(1.0, "Clip the global gradient norm to this value; 0 disables clipping.", "optim")
    batch_size: int = _opt(4096, "Activation rows (tokens) per micro-batch on each process.", "optim")
    grad_accum_steps: int = _opt(1, "Micro-batches accumulated per optimizer step.", "optim")
    train_steps: Optional[int] = _opt(None, "Optimizer steps to train for. Default: from total_tokens.", "optim")
    total_tokens: int = _opt(2_000_000, "Training tokens (rows) over all processes when train_steps is not given.", "optim")
    autocast_bf16: bool = _opt(False, "Run the SAE forward/backward under torch.autocast(bfloat16); weights stay in dtype.", "optim")
    normalize: str = _opt("none", "Input scaling: none; dataset_scale (scale so the mean squared norm is d_in); "
                                  "dataset_center_scale (subtract the dataset mean, then scale). Estimated on the "
                                  "held-out batches and folded into the saved SAE, which takes raw activations.", "optim")
    seed: int = _opt(0, "Seed for the SAE init, the data order and every RNG (resume restores them).", "optim")
    cpu_threads: Optional[int] = _opt(None, "torch intra-op threads for a CPU run (torch.set_num_threads) while the "
                                            "command runs. Default: torch's choice; 1 for the synthetic default, "
                                            "whose small matrices run fastest on one thread.", "optim")

    # --- run folder, checkpoints, logging -----------------------------------------------------
    out_dir: str = _opt("runs", "Parent folder of run folders.", "run")
    run_name: Optional[str] = _opt(None, "Run folder name under out_dir. Default: <source>-<architecture>-<timestamp>.", "run")
    checkpoint_every: int = _opt(1000, "Write a resumable checkpoint every N optimizer steps (and always at the end); "
                                       "0: only at the end.", "run", resume_safe=True)
    keep_checkpoints: int = _opt(2, "How many most recent checkpoints to keep.", "run", resume_safe=True)
    log_every: int = _opt(10, "Log training metrics (metrics.jsonl, TensorBoard, progress bar) every N steps.", "run",
                          resume_safe=True)
    eval_every: int = _opt(0, "Reconstruction evals on the held-out batches every N steps; 0: only at the end.", "run",
                           resume_safe=True)
    eval_batches: int = _opt(4, "Held-out batches (drawn before training, never trained on) for reconstruction evals.", "run")
    dense_threshold: float = _opt(0.1, "A latent firing on more than this fraction of held-out tokens counts as dense.", "run",
                                  resume_safe=True)
    tensorboard: bool = _opt(True, "Write TensorBoard event files to <run>/tensorboard.", "run", resume_safe=True)
    wandb: bool = _opt(False, "Also log to Weights & Biases (needs `pip install wandb`).", "run", resume_safe=True)
    wandb_project: str = _opt("saefast", "wandb project name.", "run", resume_safe=True)
    progress_bar: bool = _opt(True, "Show a tqdm progress bar with loss, L0, dead fraction and tokens/s.", "run",
                              resume_safe=True)

    # --- activation source: transformer-lens model + dataset, or a cache -------------------------
    model: Optional[str] = _opt(None, "transformer-lens model name (e.g. gpt2). Omit model, dataset and cache_dir "
                                      "to train on the embedded synthetic default.", "data")
    hook: Optional[str] = _opt(None, "Hook to read activations from, e.g. blocks.8.hook_resid_pre (cache runs: recorded "
                                     "in the saved SAE). Repeat --hook to read several (the same as --hooks).", "data",
                               sources=("model", "cache"))
    hooks: List[str] = _opt([], "Several hooks read in one model pass (or from one cache): one SAE per hook, each with "
                                "its own optimizer, metrics and run sub-folder <run>/<hook>; with --architecture "
                                "crosscoder, the layers of one crosscoder. 'all-resid' stands for every "
                                "blocks.<i>.hook_resid_post.", "data", sources=("model", "cache"))
    target_hook: Optional[str] = _opt(None, "Transcoders: the hook the SAE writes (its target), read in the same model "
                                            "pass as hook, e.g. --hook blocks.8.ln2.hook_normalized --target-hook "
                                            "blocks.8.hook_mlp_out. Repeat --target-hook, once per --hook, for several "
                                            "transcoders.", "data", sources=("model", "cache"))
    target_hooks: List[str] = _opt([], "Several transcoders: one target hook per entry of hooks, in the same order.",
                                   "data", sources=("model", "cache"))
    dataset: Optional[str] = _opt(None, "Hugging Face dataset name, or a local dataset folder / json / jsonl / csv / "
                                        "parquet / txt file (works offline).", "data")
    dataset_split: str = _opt("train", "Dataset split.", "data", sources=("model",))
    text_column: str = _opt("text", "Column holding raw text (tokenised on the fly).", "data", sources=("model",))
    tokens_column: Optional[str] = _opt(None, "Column holding pre-tokenised ids; used instead of text_column.", "data",
                                        sources=("model",))
    context_size: int = _opt(128, "Tokens per window fed to the model (at most the model's context length).", "data",
                             sources=("model",))
    prepend_bos: bool = _opt(True, "Prepend BOS to each window (its activation is dropped from training).", "data",
                             sources=("model",))
    model_batch_size: int = _opt(8, "Windows per model forward pass.", "data", sources=("model",))
    buffer_tokens: int = _opt(65536, "Activations held in the shuffling buffer (mixes tokens across sequences).", "data",
                              sources=("model",))
    model_dtype: str = _opt("float32", "dtype of the transformer-lens model.", "data", sources=("model",))
    cache_dir: Optional[str] = _opt(None, "Train from activations cached by `saefast cache` in this folder instead of "
                                          "running a model.", "data")

    # --- synthetic default ------------------------------------------------------------------
    synthetic_features: int = _opt(128, "Synthetic default: planted dictionary size.", "synthetic",
                                   sources=("synthetic",))
    synthetic_active: float = _opt(4.0, "Synthetic default: mean number of active planted features per row.", "synthetic",
                                   sources=("synthetic",))
    synthetic_zipf_exponent: float = _opt(0.6, "Synthetic default: feature i fires with probability ~ (i+1)^-exponent.",
                                          "synthetic", sources=("synthetic",))
    synthetic_noise: float = _opt(0.01, "Synthetic default: std of Gaussian noise added to each activation entry.", "synthetic",
                                  sources=("synthetic",))
    synthetic_linear: float = _opt(0.0, "Synthetic transcoder pairs (d_out): weight of a planted linear map from input to "
                                         "target (what skip_connection can learn).", "synthetic", sources=("synthetic",))
    synthetic_layers: int = _opt(3, "Synthetic crosscoder data (architecture crosscoder): layers the planted features "
                                    "span, each a contiguous run of them.", "synthetic", sources=("synthetic",))

    # --- model evals and end-to-end losses ----------------------------------------------------
    eval_ce_batches: int = _opt(4, "Model runs: batches of model_batch_size windows for the CE / KL evals with the SAE "
                                   "spliced in; 0 disables them.", "evals", resume_safe=True, sources=("model",))
    e2e_kl_weight: float = _opt(0.0, "Weight of KL(clean logits || SAE-patched logits) added to the loss (model runs); "
                                     "0 disables.", "e2e")
    e2e_block_mse_weight: float = _opt(0.0, "Weight of the MSE of later-layer activations with the SAE spliced in; "
                                            "0 disables.", "e2e")
    e2e_downstream_hooks: List[str] = _opt([], "Hooks compared by the block-MSE loss (e.g. blocks.10.hook_resid_post).", "e2e")
    e2e_batch_size: int = _opt(2, "Windows per step for the end-to-end losses.", "e2e")

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the option and the fix for any inconsistent value."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hints[f.name] in (float, Optional[float]) and isinstance(value, (int, float)) \
                    and not math.isfinite(value):
                flag = "--" + f.name.replace("_", "-")
                raise ValueError(f"{f.name}={value} ({flag}) must be a finite number")
        self._resolve_transcoder_architecture()
        self.architecture = canonical_architecture(self.architecture)
        if self.device is not None:
            parse_device(self.device)
        self._check_sae_options()
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={self.normalize!r} must be one of {NORMALIZATIONS}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {_DTYPES}")
        positive_ints = ("batch_size", "grad_accum_steps", "expansion_factor", "n_batches_to_dead", "context_size", "model_batch_size", "buffer_tokens", "eval_batches", "log_every",
                         "keep_checkpoints", "synthetic_features", "e2e_batch_size", "synthetic_layers")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("d_in", "d_sae", "d_out", "train_steps", "top_k", "top_k_aux", "cpu_threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer or unset")
        for name in ("checkpoint_every", "eval_every", "lr_warmup_steps", "eval_ce_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr={self.lr} must be a positive finite number")
        if not 0 <= self.lr_decay_floor <= 1:
            raise ValueError(f"lr_decay_floor={self.lr_decay_floor} must be in [0, 1] (a fraction of lr)")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be >= 0 (0 disables clipping)")
        if self.total_tokens < 1:
            raise ValueError(f"total_tokens={self.total_tokens} must be positive")
        for name in ("aux_penalty", "l1_coefficient", "e2e_kl_weight", "e2e_block_mse_weight", "synthetic_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 < self.dense_threshold <= 1:
            raise ValueError(f"dense_threshold={self.dense_threshold} must be in (0, 1]")
        if self.top_k is not None and self.d_in is not None and self.d_sae is None \
                and self.d_in * self.expansion_factor < self.top_k:
            raise ValueError(f"top_k={self.top_k} exceeds d_sae={self.d_in * self.expansion_factor}")
        if self.top_k is not None and self.d_sae is not None and self.top_k > self.d_sae:
            raise ValueError(f"top_k={self.top_k} must be at most d_sae={self.d_sae}")
        if self.input_unit_norm and self.normalize != "none":
            raise ValueError("input_unit_norm=True already standardises each token; set normalize='none'")
        uses_model = self.model is not None or self.dataset is not None
        if uses_model and self.cache_dir is not None:
            raise ValueError("give either cache_dir (train from cached activations) or model + dataset, not both")
        if uses_model and (self.model is None or self.dataset is None or not self.hook_list):
            missing = [n for n, v in (("model", self.model), ("hook", self.hook_list), ("dataset", self.dataset))
                       if not v]
            raise ValueError(f"a model run needs model, hook and dataset; missing: {', '.join(missing)}")
        self._check_hooks()
        if self.uses_e2e and self.model is None:
            raise ValueError("end-to-end losses (e2e_kl_weight, e2e_block_mse_weight) need a model run: "
                             "set model, hook and dataset")
        if self.uses_e2e and (self.is_transcoder or len(self.hook_list) > 1):
            raise ValueError("end-to-end losses splice one SAE at the hook it reads; they do not apply to transcoders, "
                             "crosscoders or several hooks: drop e2e_kl_weight / e2e_block_mse_weight")
        if self.e2e_block_mse_weight > 0 and not self.e2e_downstream_hooks:
            raise ValueError("e2e_block_mse_weight > 0 needs e2e_downstream_hooks (the later hooks to compare)")
        if self.synthetic_active <= 0:
            raise ValueError(f"synthetic_active={self.synthetic_active} must be positive")

    def check_no_ignored_options(self) -> None:
        """Every option set away from its default must act on the run: one that would be ignored
        (an option of another activation source, total_tokens next to train_steps, a TopK option on
        a ReLU SAE, ...) raises a ValueError with the reason. A new run checks this before any work
        (``RunFolder.prepare``); the config of an existing run is read back without it."""
        kind = self.source_kind
        what = {"model": "a model run (--model/--hook/--dataset)", "cache": "a cache run (--cache-dir)",
                "synthetic": "the synthetic default (no --model, --dataset or --cache-dir)"}
        for f in dataclasses.fields(self):
            sources = f.metadata.get("sources")
            if sources and kind not in sources and getattr(self, f.name) != _default(f):
                needs = " or ".join(what[s].split(" (")[0] for s in sources)
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} ({_flag(f.name)}) only acts on {needs}; this is "
                                 f"{what[kind]}: drop it")
        defaults = {f.name: _default(f) for f in dataclasses.fields(self)}

        def set_(name: str) -> bool:
            return getattr(self, name) != defaults[name]

        if self.train_steps is not None and set_("total_tokens"):
            raise ValueError(f"total_tokens={self.total_tokens} (--total-tokens) has no effect when train_steps="
                             f"{self.train_steps} (--train-steps) fixes the length of the run: give one of them")
        if self.d_sae is not None and set_("expansion_factor") and self.d_in is not None \
                and self.d_sae != self.expansion_factor * self.d_in:
            raise ValueError(f"expansion_factor={self.expansion_factor} (--expansion-factor) has no effect when d_sae="
                             f"{self.d_sae} (--d-sae) is given: give one of them")
        if set_("wandb_project") and not self.wandb:
            raise ValueError(f"wandb_project={self.wandb_project!r} (--wandb-project) has no effect without --wandb")
        if self.e2e_block_mse_weight == 0 and set_("e2e_downstream_hooks"):
            raise ValueError("e2e_downstream_hooks (--e2e-downstream-hooks) has no effect unless "
                             "--e2e-block-mse-weight is above 0")
        if not self.uses_e2e and set_("e2e_batch_size"):
            raise ValueError(f"e2e_batch_size={self.e2e_batch_size} (--e2e-batch-size) has no effect without an "
                             "end-to-end loss (--e2e-kl-weight or --e2e-block-mse-weight)")
        cls = variant_class(self.architecture)
        unused = ("l1_coefficient",) if cls.needs_top_k else ("top_k", "top_k_aux", "aux_penalty")
        for name in unused:
            if set_(name):
                why = ("the TopK variants select by top_k and have no L1/L0 penalty" if cls.needs_top_k else
                       "it has no TopK selection and no aux-K loss")
                raise ValueError(f"{name}={getattr(self, name)!r} ({_flag(name)}) has no effect on architecture="
                                 f"{self.architecture!r}: {why}; drop it")

    def _resolve_transcoder_architecture(self) -> None:
        """architecture='transcoder' (or skip_transcoder, jumprelu_transcoder,
        jumprelu_skip_transcoder) stands for its activation with the transcoder options set: the
        skip connection where the name has it, and on the synthetic default a target as wide as
        the input unless d_out is given. Model and cache runs name the target with target_hook."""
        transcoder = _transcoder_name(self.architecture)
        if transcoder is None:
            return
        name, self.architecture, skip = transcoder
        self.skip_connection = self.skip_connection or skip
        if self.source_kind == "synthetic":
            if self.d_out is None:
                self.d_out = self.d_in if self.d_in is not None else SYNTHETIC_D_IN
        elif self.target_hook is None and not self.target_hooks:
            raise ValueError(f"architecture={name!r} writes another hook than it reads: give target_hook "
                             "(--target-hook, e.g. blocks.8.hook_mlp_out for --hook blocks.8.ln2.hook_normalized)")

    def _check_hooks(self) -> None:
        """hook / hooks / target_hook / target_hooks / d_out agree with each other and the source."""
        if self.is_crosscoder and (self.target_hook is not None or self.target_hooks or self.d_out is not None):
            raise ValueError("a crosscoder writes the layers it reads: target_hook / target_hooks / d_out do not apply")
        if self.hook is not None and self.hooks:
            raise ValueError(f"give hook={self.hook!r} or hooks={self.hooks!r}, not both (repeating --hook fills hooks)")
        if len(set(self.hooks)) != len(self.hooks):
            raise ValueError(f"hooks={self.hooks!r} names a hook twice")
        if "all-resid" in self.hooks and self.hooks != ["all-resid"]:
            raise ValueError("hooks='all-resid' stands for every residual hook; give it alone")
        if self.target_hook is not None and self.target_hooks:
            raise ValueError("give target_hook or target_hooks, not both")
        if self.target_hook is not None and self.hooks:
            raise ValueError(f"hooks names {len(self.hooks)} hooks but only one target_hook is given; give one target "
                             "per input hook, in the same order (repeat --target-hook)")
        if self.target_hook is not None and self.hook is None:
            raise ValueError("target_hook is the target of the hook a transcoder reads: give hook too "
                             "(several transcoders: hooks and target_hooks)")
        if self.target_hooks and len(self.target_hooks) != len(self.hooks):
            raise ValueError(f"target_hooks names {len(self.target_hooks)} hooks but hooks names {len(self.hooks)}; "
                             "give one target per input hook, in the same order")
        # hooks on the synthetic default are refused by check_no_ignored_options (their sources)
        if self.source_kind != "synthetic" and self.d_out is not None and not self.target_hook \
                and not self.target_hooks:
            raise ValueError(f"d_out={self.d_out} is a transcoder's output width, which model and cache runs take from "
                             "target_hook: give target_hook, or drop d_out")
        if self.skip_connection and not self.is_transcoder:
            raise ValueError("skip_connection=True needs a transcoder: give target_hook (or d_out on the synthetic "
                             "default)")
        if self.synthetic_linear and self.source_kind == "synthetic" and self.d_out is None:
            raise ValueError("synthetic_linear is the linear part of synthetic transcoder pairs: it needs d_out")

    @property
    def hook_list(self) -> List[str]:
        """The hooks read: [hook], or hooks (possibly ['all-resid'], resolved against the model)."""
        return [self.hook] if self.hook is not None else list(self.hooks)

    @property
    def is_transcoder(self) -> bool:
        """The run trains transcoders: target hooks given (or d_out on the synthetic default)."""
        return self.target_hook is not None or bool(self.target_hooks) or self.d_out is not None

    @property
    def is_crosscoder(self) -> bool:
        """The architecture reads several layers as one input (its class declares ``multi_layer``)."""
        return bool(getattr(variant_class(self.architecture), "multi_layer", False))

    @property
    def is_multi(self) -> bool:
        """The run trains one SAE per hook (several hooks, not a crosscoder)."""
        return not self.is_crosscoder and (len(self.hooks) > 1 or self.hooks == ["all-resid"])

    def _check_sae_options(self) -> None:
        """Options of another architecture than the chosen one must keep their defaults: a flag
        that would have no effect is refused rather than ignored."""
        own = {f.name for f in variant_options(variant_class(self.architecture))}
        for cls in variant_classes():
            if cls.architecture == self.architecture:
                continue
            for f in variant_options(cls):
                if f.metadata.get("train") and f.name not in own and getattr(self, f.name) != _default(f):
                    flag = "--" + f.name.replace("_", "-")
                    raise ValueError(f"{f.name}={getattr(self, f.name)!r} ({flag}) is an option of architecture="
                                     f"{cls.architecture!r}; it has no effect on architecture={self.architecture!r}: "
                                     f"drop it, or pass --architecture {cls.architecture}")

    def check_trainable(self) -> None:
        """What can only be checked once a run starts (TrainConfig() itself stays buildable):
        the chosen architecture's required options are set."""
        if variant_class(self.architecture).needs_top_k and self.top_k is None:
            raise ValueError(f"architecture={self.architecture!r} needs top_k, the active latents per token: pass "
                             "--top-k (e.g. --top-k 32)")

    def sae_config(self, d_in: int, device: Any, *, d_out: Optional[int] = None,
                   layer_hooks: Optional[List[str]] = None, n_layers: Optional[int] = None,
                   **metadata: Any) -> SAEConfig:
        """The SAEConfig this run trains: its SAE options, ``d_in``, ``d_sae`` (or
        ``expansion_factor * d_in``; a crosscoder's per-layer width), ``device``, the seed, the
        hook and ``metadata`` (model_name, dataset_path, ...). A transcoder also gets ``d_out``
        and its target hook; a crosscoder its ``n_layers`` and their ``layer_hooks``. A missing or
        bad value raises a ValueError naming the flag."""
        names = {f.name for f in _sae_option_fields(variant_class(self.architecture))}
        values: Dict[str, Any] = {name: getattr(self, name) for name in names}
        base_width = d_in
        if self.is_crosscoder:
            layers = len(layer_hooks) if layer_hooks else (n_layers or 1)
            values.update(crosscoder_layers=layers, crosscoder_hooks=list(layer_hooks) if layer_hooks else None)
            base_width = d_in // layers
        d_sae = self.d_sae if self.d_sae is not None else self.expansion_factor * base_width
        ef_default = next(_default(f) for f in dataclasses.fields(self) if f.name == "expansion_factor")
        if self.d_sae is not None and self.expansion_factor != ef_default and \
                self.d_sae != self.expansion_factor * base_width:
            raise ValueError(f"expansion_factor={self.expansion_factor} (--expansion-factor) has no effect when "
                             f"d_sae={self.d_sae} (--d-sae) is given: give one of them")
        values.update(d_in=d_in, d_sae=d_sae, device=str(device), seed=self.seed, **metadata)
        hook = layer_hooks[-1] if layer_hooks else self.hook
        if hook is not None:
            layer, name = parse_hook(hook)
            values.update(hook_spec=hook, hook_name=name)
            if layer is not None:
                values["hook_layer"] = layer
        if d_out is not None:
            values.update(d_out=d_out, hook_spec_out=self.target_hook)
        self.check_trainable()
        try:
            return SAEConfig(**values)
        except ValueError as err:
            raise ValueError(f"{err} (from the training options: set it with the flag of that name)") from None

    @property
    def uses_e2e(self) -> bool:
        return self.e2e_kl_weight > 0 or self.e2e_block_mse_weight > 0

    @property
    def source_kind(self) -> str:
        """"model", "cache" or "synthetic": where activations come from."""
        if self.model is not None:
            return "model"
        return "cache" if self.cache_dir is not None else "synthetic"

    def steps_for(self, world_size: int = 1) -> int:
        """Optimizer steps of the run: train_steps, or total_tokens over the tokens per step."""
        if self.train_steps is not None:
            return self.train_steps
        per_step = self.batch_size * self.grad_accum_steps * world_size
        return max(1, math.ceil(self.total_tokens / per_step))

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        """Build from a dict; unknown keys raise a ValueError listing them and the valid ones."""
        if not isinstance(values, dict):
            raise TypeError(f"a config must be a mapping of option names to values, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; valid options: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})

    @classmethod
    def with_defaults_for_source(cls, values: Dict[str, Any]) -> "TrainConfig":
        """``from_dict``, with :data:`SYNTHETIC_DEFAULTS` beneath ``values`` when they name no
        model, dataset or cache (the embedded synthetic run)."""
        if all(values.get(k) is None for k in ("model", "dataset", "cache_dir")):
            defaults = dict(SYNTHETIC_DEFAULTS)
            # a default gives way to the option it would contradict
            if values.get("total_tokens") is not None:
                defaults.pop("train_steps")
            if values.get("d_sae") is not None:
                defaults.pop("expansion_factor")
            name = values.get("architecture", DEFAULT_ARCHITECTURE)
            transcoder = _transcoder_name(name)
            name = transcoder[1] if transcoder else name
            try:
                name = canonical_architecture(name)
                if not variant_class(name).needs_top_k:
                    defaults.pop("top_k")
            except ValueError:
                pass  # an unknown architecture is reported by validate()
            defaults.update(SYNTHETIC_ARCHITECTURE_DEFAULTS.get(name, {}))
            values = {**defaults, **values}
        return cls.from_dict(values)

    @classmethod
    def from_file(cls, path: Union[str, Path], **overrides: Any) -> "TrainConfig":
        """Load a YAML (.yaml/.yml) or JSON (.json) file; ``overrides`` win over the file."""
        return cls.from_dict({**load_config_file(path), **overrides})

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def differences(self, other: "TrainConfig") -> Dict[str, tuple]:
        """{option: (self value, other value)} for options that change what is trained. ``d_in``
        and ``d_sae`` left unset on one side (to be derived) match any value on the other."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {f.name: (mine[f.name], theirs[f.name]) for f in dataclasses.fields(self)
                if not f.metadata.get("resume_safe") and f.name not in ("out_dir", "run_name")
                and mine[f.name] != theirs[f.name]
                and not (f.name in ("d_in", "d_sae") and None in (mine[f.name], theirs[f.name]))}


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check (and where lossless, convert) a config value to its field's type. YAML reads
    ``1e-3`` as a string, so numeric strings are accepted for float fields."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    tp = args[0] if optional else hint
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must not be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        if isinstance(value, (list, tuple)):
            try:
                return [_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
            except ValueError:
                pass
    else:
        return value
    if typing.get_origin(tp) is list:
        type_name = f"list of {typing.get_args(tp)[0].__name__}"
    else:
        type_name = getattr(tp, "__name__", str(tp))
    raise ValueError(f"{name}={value!r} must be of type {type_name}")


def load_config_file(path: Union[str, Path]) -> Dict[str, Any]:
    """The option mapping in a YAML or JSON file (ValueError if it is not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist" if not path.exists() else
                                f"config file {path} is not a file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}; "
                         "fix the file (an object of option names to values)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ValueError(f"config file {path} is not valid YAML: {problem}{where}; fix the file (one "
                         "'option_name: value' per line)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    return data


def _sae_option_fields(cls: Optional[type] = None) -> List[dataclasses.Field]:
    """The SAE options of ``saefast train``: SAEConfig's fields marked ``train``, then every
    variant's own (or only ``cls``'s variant); an option several variants share (a config class
    derived from another's) appears once."""
    fields = {f.name: f for f in dataclasses.fields(SAEConfig) if f.metadata.get("train")}
    for variant in (variant_classes() if cls is None else (cls,)):
        fields.update((f.name, f) for f in variant_options(variant) if f.metadata.get("train") and f.name not in fields)
    return list(fields.values())


def _train_config_class() -> type:
    owners = {}
    for cls in variant_classes():
        for f in variant_options(cls):
            owners[f.name] = cls.config_class
    fields = []
    for f in _sae_option_fields():
        owner = owners.get(f.name, SAEConfig)
        hints = typing.get_type_hints(owner)
        default = _default(f)
        help_text = f.metadata["help"]
        if f.name == "architecture":
            help_text = (f"SAE variant: {', '.join(architectures())}; or {', '.join(TRANSCODER_ARCHITECTURES)} (that "
                         "activation as a transcoder: needs target_hook on model and cache runs).")
        meta = {"help": help_text, "group": "sae", "resume_safe": False, "sae_option": True}
        if isinstance(default, list):
            fields.append((f.name, hints[f.name], field(default_factory=lambda d=default: list(d), metadata=meta)))
        else:
            fields.append((f.name, hints[f.name], field(default=default, metadata=meta)))
    namespace = {"__doc__": """All options of ``saefast train`` (see ``saefast train --help``): the run's own options
    and the SAE's, taken from SAEConfig and the variants' config classes.""", "__module__": __name__}
    return dataclasses.make_dataclass("TrainConfig", fields, bases=(_RunOptions,), namespace=namespace)


TrainConfig = _train_config_class()
