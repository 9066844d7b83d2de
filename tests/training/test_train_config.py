"""TrainConfig: validation, YAML/JSON files, CLI flags generated from the fields, precedence."""
import dataclasses
import json

import pytest

from saefast.cli import _config_from_args, build_parser
from saefast.training.config import SYNTHETIC_DEFAULTS, TrainConfig


def test_every_field_has_a_flag_with_its_help():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_text, flag
        first_words = " ".join(f.metadata["help"].split()[:3])
        assert first_words in " ".join(help_text.split()), f.name


def test_flags_override_file_which_overrides_defaults(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("lr: 1e-3\nbatch_size: 64\ntop_k: 4\ne2e_downstream_hooks: []\nmax_grad_norm: 0.5\n")
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--batch-size", "32",
                                      "--no-tensorboard", "--lr-decay-floor", "0.5"])
    cfg = _config_from_args(args)
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)  # YAML reads 1e-3 as a string
    assert cfg.batch_size == 32 and cfg.top_k == 4 and cfg.lr_decay_floor == 0.5
    assert cfg.tensorboard is False and cfg.max_grad_norm == 0.5
    assert cfg.expansion_factor == SYNTHETIC_DEFAULTS["expansion_factor"]  # no model: synthetic defaults
    assert cfg.adam_beta2 == TrainConfig().adam_beta2
    real = _config_from_args(build_parser().parse_args(["train", "--model", "gpt2", "--hook", "blocks.0.hook_resid_pre",
                                                        "--dataset", "data.jsonl"]))
    assert real.expansion_factor == TrainConfig().expansion_factor and real.batch_size == TrainConfig().batch_size

    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"architecture": "topk", "train_steps": 7}))
    assert TrainConfig.from_file(json_file, seed=3) == TrainConfig(architecture="topk", train_steps=7, seed=3)


def test_round_trip_and_differences():
    cfg = TrainConfig(d_in=16, train_steps=5)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    other = dataclasses.replace(cfg, lr=1.0, log_every=3, checkpoint_every=2)
    assert set(cfg.differences(other)) == {"lr"}  # logging/checkpoint cadence may change on resume


@pytest.mark.parametrize("values,match", [
    ({"architecture": "gated"}, "architecture"),
    ({"batch_size": 0}, "batch_size"),
    ({"lr": -1.0}, "lr"),
    ({"lr": "fast"}, "lr"),
    ({"lr_decay_floor": 2.0}, "lr_decay_floor"),
    ({"top_k": 100, "d_sae": 50}, "top_k"),
    ({"model": "gpt2"}, "missing: hook, dataset"),
    ({"model": "gpt2", "hook": "h", "dataset": "d", "cache_dir": "c"}, "cache_dir"),
    ({"e2e_kl_weight": 0.1}, "need a model run"),
    ({"normalize": "unit"}, "normalize"),
    ({"input_unit_norm": True, "normalize": "dataset_scale"}, "input_unit_norm"),
    ({"bogus_option": 1}, "unknown option"),
])
def test_bad_values_name_the_option(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(values)


def test_steps_from_tokens():
    cfg = TrainConfig(batch_size=100, grad_accum_steps=2, total_tokens=1001)
    assert cfg.steps_for(1) == 6 and cfg.steps_for(2) == 3
    assert TrainConfig(train_steps=9).steps_for(4) == 9


@pytest.mark.parametrize("flag", ["--max-grad-norm", "--synthetic-noise", "--lr", "--aux-penalty", "--adam-eps"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_numeric_flags_are_refused_naming_the_flag(flag, value, capsys):
    from saefast.cli import main
    assert main(["train", flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and "finite" in err


def test_sae_options_are_declared_once_with_one_default():
    from saefast.config import SAEConfig, variant_classes, variant_options
    from saefast.training.config import _RunOptions
    sae_fields = {f.name: f for f in dataclasses.fields(SAEConfig) if f.metadata.get("train")}
    for cls in variant_classes():
        sae_fields.update({f.name: f for f in variant_options(cls) if f.metadata.get("train")})
    run_fields = {f.name for f in dataclasses.fields(_RunOptions)}
    assert not run_fields & set(sae_fields), "an SAE option is declared again among the run's options"
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    def default(f):
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    for name, f in sae_fields.items():
        assert default(train_fields[name]) == default(f), name
        if name != "architecture":
            assert train_fields[name].metadata["help"] == f.metadata["help"], name
    cfg = TrainConfig(architecture="jumprelu", jumprelu_bandwidth=0.05, l1_coefficient=0.2)
    sae_cfg = cfg.sae_config(16, "cpu")
    assert (sae_cfg.jumprelu_bandwidth, sae_cfg.l1_coefficient, sae_cfg.d_sae) == (0.05, 0.2, 16 * cfg.expansion_factor)


def test_options_of_another_architecture_are_refused(capsys):
    from saefast.cli import main
    assert main(["train", "--jumprelu-bandwidth", "0.1", "--train-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--jumprelu-bandwidth" in err and "architecture='jumprelu'" in err
    TrainConfig(architecture="jumprelu", jumprelu_bandwidth=0.1)  # fine where it applies


def test_topk_variants_need_top_k_named_by_its_flag():
    cfg = TrainConfig(architecture="topk")
    with pytest.raises(ValueError, match="needs top_k.*--top-k"):
        cfg.sae_config(8, "cpu")
    assert TrainConfig(architecture="relu").sae_config(8, "cpu").top_k is None


def test_ignored_options_are_refused_for_new_runs_and_saved_configs_still_read(tmp_path):
    from saefast.training.run_folder import RunFolder
    # older versions wrote top_k=4 into synthetic relu runs: such a config.json still reads back (eval, analyze)
    saved = TrainConfig(architecture="relu", top_k=4, out_dir=str(tmp_path), run_name="old").to_dict()
    cfg = TrainConfig.from_dict(saved)
    assert cfg.top_k == 4
    with pytest.raises(ValueError, match=r"top_k=4 \(--top-k\) has no effect on architecture='relu'"):
        RunFolder.prepare(cfg, resume=False)  # a new run with it is refused before any work
    assert not (tmp_path / "old").exists()
    RunFolder.prepare(TrainConfig(architecture="relu", out_dir=str(tmp_path), run_name="new"), resume=False)


@pytest.mark.parametrize("name, architecture, skip", [("transcoder", "batchtopk", False),
                                                      ("Skip_Transcoder", "batchtopk", True),
                                                      ("jumprelu_transcoder", "jumprelu", False),
                                                      ("jumprelu_skip_transcoder", "jumprelu", True)])
def test_transcoder_architecture_names_set_the_transcoder_options(name, architecture, skip):
    args = ["train", "--architecture", name] + (["--top-k", "4"] if architecture == "batchtopk" else [])
    cfg = _config_from_args(build_parser().parse_args(args))
    assert (cfg.architecture, cfg.skip_connection, cfg.is_transcoder) == (architecture, skip, True)
    assert cfg.d_out == 64  # the synthetic default writes a target as wide as its input
    assert cfg.top_k == (4 if architecture == "batchtopk" else None)  # no synthetic top_k for JumpReLU
    assert TrainConfig(architecture=name, top_k=4, d_in=40, d_out=24).d_out == 24
    assert TrainConfig(architecture=name, top_k=4, d_in=40).d_out == 40
    restored = TrainConfig.from_dict(cfg.to_dict())  # config.json of such a run reads back the same
    assert (restored.architecture, restored.skip_connection, restored.d_out) == (architecture, skip, 64)
    with pytest.raises(ValueError, match="target_hook"):  # a model run must name the hook it writes
        TrainConfig(architecture=name, top_k=4, model="gpt2", hook="blocks.1.ln2.hook_normalized",
                    dataset="texts.jsonl")
    model_cfg = TrainConfig(architecture=name, top_k=4, model="gpt2", hook="blocks.1.ln2.hook_normalized",
                            dataset="texts.jsonl", target_hook="blocks.1.hook_mlp_out")
    assert model_cfg.d_out is None and model_cfg.skip_connection == skip and model_cfg.is_transcoder


def test_synthetic_relu_default_is_sparse_and_gives_way_to_flags_and_model_runs():
    parse = lambda *a: _config_from_args(build_parser().parse_args(["train", *a]))
    assert parse("--architecture", "relu").l1_coefficient == 1e-2
    assert parse("--architecture", "relu", "--l1-coefficient", "0.5").l1_coefficient == 0.5
    assert parse("--architecture", "crosscoder").l1_coefficient == TrainConfig().l1_coefficient
    model_run = TrainConfig.with_defaults_for_source({"architecture": "relu", "model": "gpt2", "dataset": "t.jsonl",
                                                      "hook": "blocks.0.hook_resid_post"})
    assert model_run.l1_coefficient == TrainConfig().l1_coefficient
