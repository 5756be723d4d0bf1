"""Converting a yolov9-e training checkpoint end to end: fxrewrite vs the official notebook's method.

Both sides read the same checkpoint with the same safe loader (as the CLI loads it: the
weights as stored, fp16) and write with the same saver; in between, fxrewrite traces, rewrites and re-binds tensors by provenance
(sharing them with the loaded model), while the baseline does what
tools/reparameterization.ipynb does: build gelan-e from its config (allocating and
initialising a second model), copy every tensor by hard-coded index offsets, and save.

Run: ``python -m pytest benchmarks/test_bench_convert.py --benchmark-only``
(target: fxrewrite at most 0.7x the baseline's time). A second group times the stage the two
methods differ in, on the loaded model: ``convert`` vs building gelan-e and copying by index.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from fxrewrite.yolov9 import DetectionModel, convert
from fxrewrite.yolov9.checkpoint import _fp16_copy, _pickle_module, _torch_default_globals, load_checkpoint, save_checkpoint
from fxrewrite.yolov9.classes import allowed_globals, official_aliases


@pytest.fixture(scope="module")
def yolov9_e_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = DetectionModel("yolov9-e")
    official_names = {cls: name for name, cls in official_aliases().items()}
    loadable = set(allowed_globals()) | _torch_default_globals() | set(official_names.values())
    path = tmp_path_factory.mktemp("bench") / "yolov9-e-train.pt"
    data = {"model": None, "ema": _fp16_copy(model, official_names), "optimizer": None, "epoch": 499,
            "updates": 1000, "best_fitness": None, "opt": {}, "git": None, "date": "2026-11-27"}
    with open(path, "wb") as f:
        torch.save(data, f, pickle_module=_pickle_module(official_names, loadable))
    return path


def load(src):
    """As ``fxrewrite convert`` loads: the weights as stored (fp16), read into memory."""
    return load_checkpoint(src, dtype=None)


def fxrewrite_pipeline(src, out):
    conversion = convert(load(src).model)
    save_checkpoint(conversion.model, out, force=True)


def notebook_pipeline(src, out):
    loaded = load(src)
    gelan = notebook_stage(loaded.model)
    gelan.names = loaded.model.names
    save_checkpoint(gelan, out, force=True)


def notebook_stage(training):
    """What the notebook does between loading and saving: build gelan-e, copy tensors by index."""
    train = training.state_dict()
    gelan = DetectionModel("gelan-e", nc=training.yaml["nc"])
    state = gelan.state_dict()
    for name in state:  # the notebook's hard-coded yolov9-e offsets
        _, index, rest = name.split(".", 2)
        index = int(index)
        if index == 42:
            first, _, tail = rest.partition(".")
            rest = {"cv2": "cv4", "cv3": "cv5", "dfl": "dfl2"}.get(first, first) + "." + tail
            source = f"model.49.{rest}"
        else:
            source = f"model.{index + 7 if index >= 29 else index}.{rest}"
        state[name] = train[source]
    gelan.load_state_dict(state)
    return gelan


@pytest.mark.benchmark(group="convert yolov9-e checkpoint")
def test_fxrewrite_convert(benchmark, yolov9_e_checkpoint, tmp_path):
    benchmark.pedantic(fxrewrite_pipeline, args=(yolov9_e_checkpoint, tmp_path / "fx.pt"), rounds=7, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="convert yolov9-e checkpoint")
def test_notebook_baseline(benchmark, yolov9_e_checkpoint, tmp_path):
    benchmark.pedantic(notebook_pipeline, args=(yolov9_e_checkpoint, tmp_path / "nb.pt"), rounds=7, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def loaded_yolov9_e(yolov9_e_checkpoint):
    return load(yolov9_e_checkpoint).model


@pytest.mark.benchmark(group="conversion stage only: yolov9-e loaded -> gelan-e model")
def test_fxrewrite_stage(benchmark, loaded_yolov9_e):
    benchmark.pedantic(convert, args=(loaded_yolov9_e,), rounds=7, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="conversion stage only: yolov9-e loaded -> gelan-e model")
def test_notebook_stage(benchmark, loaded_yolov9_e):
    benchmark.pedantic(notebook_stage, args=(loaded_yolov9_e,), rounds=7, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="convert yolov9-e checkpoint, interleaved A/B")
def test_paired_ratio(benchmark, yolov9_e_checkpoint, tmp_path):
    """Each round runs fxrewrite, notebook, notebook, fxrewrite and records (A + A) / (B + B): on a
    shared machine, blocks of rounds run one after the other drift apart by +-10%; the median of
    interleaved ratios does not."""
    ratios = []

    def timed(pipeline, out) -> float:
        start = time.perf_counter()
        pipeline(yolov9_e_checkpoint, out)
        return time.perf_counter() - start

    def abba():
        a1 = timed(fxrewrite_pipeline, tmp_path / "fx.pt")
        b1, b2 = timed(notebook_pipeline, tmp_path / "nb.pt"), timed(notebook_pipeline, tmp_path / "nb.pt")
        a2 = timed(fxrewrite_pipeline, tmp_path / "fx.pt")
        ratios.append((a1 + a2) / (b1 + b2))

    benchmark.pedantic(abba, rounds=5, iterations=1, warmup_rounds=1)
    measured = ratios[1:]
    benchmark.extra_info.update({"ratio_median": statistics.median(measured), "ratios": measured})
    print(f"\nfxrewrite / notebook, interleaved (ABBA, {len(measured)} rounds): median "
          f"{statistics.median(measured):.3f}, range {min(measured):.3f}..{max(measured):.3f}")


def test_both_pipelines_write_the_same_weights(yolov9_e_checkpoint, tmp_path):
    fxrewrite_pipeline(yolov9_e_checkpoint, tmp_path / "fx.pt")
    notebook_pipeline(yolov9_e_checkpoint, tmp_path / "nb.pt")
    a = load_checkpoint(tmp_path / "fx.pt", dtype=None).model.state_dict()
    b = load_checkpoint(tmp_path / "nb.pt", dtype=None).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
