"""The analytic step model (benchmarks/perf_model.py) and the GPU check's summary: the floor is the
encoder GEMM plus one Adam pass at the device's ceilings, every contender costs at least the
floor, and predictions are labelled as such beside measured figures."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402
import perf_model  # noqa: E402


@pytest.mark.parametrize("mode,flops_rate,master_bytes", [("fp32", 67e12, 4), ("bf16-autocast", 790e12, 4),
                                                           ("bf16", 790e12, 2)])
def test_floor_is_gemm_plus_one_adam_pass(mode, flops_rate, master_bytes):
    s = perf_model.Shape(d_in=2304, d_sae=1 << 17, batch=4096, k=64, mode=mode)
    dev = perf_model.DEVICES["H200"]
    pred = perf_model.predict(s, dev)
    gemm = 2 * 4096 * 2304 * (1 << 17) / flops_rate
    adam = 2 * 2304 * (1 << 17) * master_bytes * 7 / 4.3e12 + dev.launch_s
    assert pred["floor"]["seconds"] == pytest.approx(gemm + adam, rel=1e-9)


@pytest.mark.parametrize("d_sae", [1 << 14, 1 << 17, 1 << 20])
@pytest.mark.parametrize("mode", ["fp32", "bf16-autocast", "bf16"])
def test_every_contender_costs_at_least_the_floor_and_phases_add_up(d_sae, mode):
    for dev in perf_model.DEVICES.values():
        pred = perf_model.predict(perf_model.Shape(d_sae=d_sae, mode=mode), dev)
        for name, c in pred["contenders"].items():
            assert c["seconds"] >= pred["floor"]["seconds"], name
            assert c["seconds"] == pytest.approx(sum(r["seconds"] for r in c["phases"]))
        if d_sae >= 1 << 17:  # below, k_aux = 512 among 5 % dead latents is dense enough to favour dense code
            assert pred["contenders"]["dense"]["seconds"] > pred["contenders"]["saefast"]["seconds"]


def test_largest_d_sae_grows_with_memory_and_dense_fits_less():
    s = perf_model.Shape(mode="fp32")
    small, large = (perf_model.largest_d_sae(s, "saefast", m) for m in (80e9, 141e9))
    assert 0 < small < large
    assert perf_model.largest_d_sae(s, "dense", 141e9) < large


def test_gpu_check_summary_labels_predictions():
    doc = {"env": {"commit": "abc", "device": "NVIDIA H200"}, "profile": "cuda", "elapsed_s": 1,
           "stages": {"step": {"status": "ok", "rows": [
               {"mode": "fp32", "impl": "floor-gemm", "median_ms": 40.0, "tokens_per_s": 1},
               {"mode": "fp32", "impl": "floor-adam", "median_ms": 4.0, "tokens_per_s": 1},
               {"mode": "fp32", "impl": "saefast", "median_ms": 55.0, "tokens_per_s": 1}],
               "prediction": gpu_check._prediction(perf_model, gpu_check.PROFILES["cuda"], "NVIDIA H200")}}}
    text = gpu_check.summarize(doc)
    assert "55.00 ms" in text and "(prediction)" in text
    assert "saefast 1.25x floor" in text


def test_model_prices_the_aux_path_the_triton_backend_takes():
    """The model's copy of the dense-aux rule is the backend's, and it prices the dense block
    exactly where the backend would take it."""
    from saefast import triton_backend as tb
    assert perf_model.AUX_DENSE_RATIO == tb.AUX_DENSE_RATIO
    assert perf_model.DENSE_BLOCK_BYTES == tb.DENSE_BLOCK_BYTES
    import torch
    for mode, dtype, kind in (("fp32", torch.float32, "ieee"), ("bf16", torch.bfloat16, "16bit")):
        for d_sae, k_aux, dead_fraction in ((1 << 17, 512, 0.05), (1 << 17, 16, 0.05), (1 << 20, 512, 0.05),
                                            (1 << 14, 512, 0.5)):
            s = perf_model.Shape(d_sae=d_sae, k_aux=k_aux, dead_fraction=dead_fraction, mode=mode)
            assert perf_model.aux_dense(s) == tb.aux_dense_pays(s.batch, s.n_dead, k_aux, dtype, kind), (mode, d_sae)
            names = [p.name for p in perf_model.saefast(s, perf_model.DEVICES["H200"])]
            assert any(n.startswith("aux decode: dense block") for n in names) == perf_model.aux_dense(s)


def test_report_puts_a_recorded_gpu_check_beside_the_prediction(tmp_path):
    import report
    assert report.gpu_check_sections(tmp_path) == []  # no GPU check recorded: no section, no figure
    doc = {"env": {"commit": "abc", "device": "NVIDIA H200"}, "profile": "cuda", "elapsed_s": 1,
           "stages": {"tests": {"status": "ok"}, "step": {"status": "ok", "rows": [
               {"mode": "fp32", "impl": "floor-gemm", "median_ms": 40.0, "tokens_per_s": 1},
               {"mode": "fp32", "impl": "floor-adam", "median_ms": 4.0, "tokens_per_s": 1},
               {"mode": "fp32", "impl": "saefast", "median_ms": 55.0, "tokens_per_s": 1}],
               "prediction": gpu_check._prediction(perf_model, gpu_check.PROFILES["cuda"], "NVIDIA H200")}}}
    for day, ms in (("2026-11-01", 99.0), ("2026-12-01", 55.0)):
        (tmp_path / f"gpu-check-{day}").mkdir()
        doc["stages"]["step"]["rows"][2]["median_ms"] = ms
        (tmp_path / f"gpu-check-{day}" / "check.json").write_text(json.dumps(doc))
    text = "\n".join(report.gpu_check_sections(tmp_path))
    assert "gpu-check-2026-12-01" in text and "55.00 ms" in text and "99.00" not in text  # the newest check
    assert "ms (prediction)" in text and "- fp32: measured floor 44.00 ms, saefast 1.25x floor" in text
