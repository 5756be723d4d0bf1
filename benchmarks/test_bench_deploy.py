"""Benchmark: CPU inference latency of a YOLOv9 model through the deployment pipeline.

One image, 640x640, batch 1, 2 threads (``torch.set_num_threads(2)``; ONNX Runtime
with ``intra_op_num_threads=2``), in one run, for yolov9-t and yolov9-c:

* ``training``: the training model (dual head, auxiliary branch), eval mode;
* ``converted``: after ``fxrewrite.yolov9.convert`` (the GELAN inference model);
* ``fused``: converted, then ``rules/deploy.yaml`` (BatchNorms folded, RepConvN merged);
* ``onnxruntime``: the fused model exported by ``fxrewrite.yolov9.export`` to ONNX, run in ONNX Runtime;
* ``gelan-direct``: the GELAN model built directly from its config (gelan-t / gelan-c) and
  given the converted model's weights, the reference for "the converted model runs like a
  GELAN model";
* ``official-fused``: the official code's gelan model after its own ``fuse()`` (when the
  oracle of ``tests/helpers/official.py`` is installed), the reference for the fused model.

Run with (the normal test run does not collect this folder)::

    python -m pytest benchmarks --benchmark-only -k deploy

Each model is one benchmark group; after the module a table of median latencies and
the ratios converted / gelan-direct and fused / official-fused is printed (medians:
on a shared machine a round now and then is preempted, which distorts the means).
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from fxrewrite.yolov9 import DetectionModel, convert
from fxrewrite.yolov9.cli import randomise_batchnorm
from fxrewrite.yolov9.deploy import fuse

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the helpers package
from helpers.official import official, official_available  # noqa: E402

THREADS = 2
SIZE = 640
VARIANTS = ["t", "c"]
ROUNDS = {"t": 30, "c": 15}
CONTENDERS = ["training", "converted", "fused", "onnxruntime", "gelan-direct", "official-fused"]
_MODELS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _threads_and_summary(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)
    _MODELS.clear()
    _summary(request.config)


def _models(variant: str, tmp_path_factory) -> dict:
    """Every contender of one variant, built once (the previous variant's are released first)."""
    if variant not in _MODELS:
        _MODELS.clear()
        gc.collect()
        torch.manual_seed(0)
        training = DetectionModel(f"yolov9-{variant}")
        randomise_batchnorm(training, seed=1)
        training.eval()
        conversion = convert(training)
        fused = fuse(conversion.model).model.eval()
        torch.manual_seed(0)
        gelan = DetectionModel(f"gelan-{variant}").eval()
        # The same weights as the converted model: with its own random weights (default BatchNorm
        # statistics) gelan-t runs ~20% slower here (denormal activations), which says nothing about
        # the structure the comparison is about.
        gelan.load_state_dict(conversion.model.state_dict())
        models = {"training": training, "converted": conversion.model, "fused": fused, "gelan-direct": gelan}
        if official_available():
            reference = official().build(f"gelan-{variant}.yaml", nc=80)
            reference.load_state_dict(conversion.model.state_dict())
            models["official-fused"] = reference.eval().fuse()
        try:
            import onnxruntime as ort

            from fxrewrite.yolov9.export import export_onnx

            path = export_onnx(fused, tmp_path_factory.mktemp("onnx") / f"gelan-{variant}.onnx", imgsz=SIZE)
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
            models["onnxruntime"] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except ImportError:
            pass
        _MODELS[variant] = models
    return _MODELS[variant]


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_deploy_latency(benchmark, variant, contender, tmp_path_factory):
    model = _models(variant, tmp_path_factory).get(contender)
    if model is None:
        pytest.skip(f"{contender} is not available (official oracle / onnxruntime not installed)")
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    if contender == "onnxruntime":
        feed = {model.get_inputs()[0].name: x.numpy()}

        def run():
            return model.run(None, feed)
    else:
        def run():
            with torch.inference_mode():
                return model(x)

    benchmark.group = f"deploy yolov9-{variant} {SIZE}x{SIZE} batch 1, {THREADS} threads"
    benchmark.extra_info.update({"deploy_variant": variant, "deploy_contender": contender})
    benchmark.pedantic(run, rounds=ROUNDS[variant], warmup_rounds=2, iterations=1)


# The two targets compare models that should run the same. Back-to-back blocks of rounds drift with
# the machine (a shared VM: +-10% between blocks), so each pair is also timed interleaved: every round
# runs A, B, B, A and records (A + A) / (B + B); the median of those ratios cancels slow drift.
PAIRS = {"converted/gelan-direct": ("converted", "gelan-direct"), "fused/official-fused": ("fused", "official-fused")}


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_deploy_paired_ratio(benchmark, variant, pair, tmp_path_factory):
    models = _models(variant, tmp_path_factory)
    first, second = (models.get(name) for name in PAIRS[pair])
    if first is None or second is None:
        pytest.skip(f"{pair}: a model is not available (official oracle not installed)")
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    ratios: list[float] = []

    def timed(model) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model(x)
        return time.perf_counter() - start

    def abba():
        a1, b1, b2, a2 = timed(first), timed(second), timed(second), timed(first)
        ratios.append((a1 + a2) / (b1 + b2))

    benchmark.group = f"deploy paired A/B, yolov9-{variant} {SIZE}x{SIZE} batch 1, {THREADS} threads"
    benchmark.pedantic(abba, rounds=ROUNDS[variant], warmup_rounds=1, iterations=1)
    measured = ratios[1:]  # the warm-up round is not one of them
    benchmark.extra_info.update({"deploy_variant": variant, "deploy_pair": pair,
                                 "ratio_median": statistics.median(measured), "ratios": measured})


def _summary(config) -> None:
    """Median latencies (robust to the odd preempted round on a shared machine) and the ratios."""
    session = getattr(config, "_benchmarksession", None)
    medians: dict[tuple[str, str], float] = {}
    paired: dict[tuple[str, str], list[float]] = {}
    for bench in getattr(session, "benchmarks", None) or ():
        info = getattr(bench, "extra_info", {}) or {}
        if "deploy_pair" in info:
            paired[(info["deploy_variant"], info["deploy_pair"])] = info["ratios"]
        elif "deploy_variant" in info and getattr(bench, "stats", None) is not None:
            medians[(info["deploy_variant"], info["deploy_contender"])] = bench.stats.median
    if not medians and not paired:
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    lines = ["", f"deploy latency, {SIZE}x{SIZE} batch 1, {THREADS} threads: median ms (ratio to the training model)",
             f"{'model':<10}" + "".join(f"{c:>17}" for c in CONTENDERS)]
    for variant in VARIANTS:
        base = medians.get((variant, "training"))
        cells = []
        for contender in CONTENDERS:
            value = medians.get((variant, contender))
            cells.append(f"{value * 1e3:8.1f} ({value / base:4.2f})" if value and base else "-")
        lines.append(f"yolov9-{variant:<3}" + "".join(f"{c:>17}" for c in cells))
    for variant in VARIANTS:
        text = []
        for ours, reference in (("converted", "gelan-direct"), ("fused", "official-fused")):
            a, b = medians.get((variant, ours)), medians.get((variant, reference))
            if a and b:
                text.append(f"{ours} / {reference} = {a / b:.3f} ({(a / b - 1) * 100:+.1f}%)")
        if text:
            lines.append(f"yolov9-{variant}: " + "; ".join(text))
    for (variant, pair), ratios in sorted(paired.items()):
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        lines.append(f"yolov9-{variant}: {pair} interleaved (ABBA, {len(ratios)} rounds): median "
                     f"{statistics.median(ratios):.3f} ({(statistics.median(ratios) - 1) * 100:+.1f}%), "
                     f"quartiles {q[0]:.3f}..{q[2]:.3f}")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        for line in lines:
            reporter.write_line(line) if reporter else print(line)
