"""Saving a yolov9-e model: fxrewrite's saver against ``torch.save``, interleaved in one run.

The model is the EMA of a yolov9-e training checkpoint (see ``train_dual_checkpoint.py``), loaded
as ``fxrewrite convert`` loads it (fp32, fxrewrite's classes). Contenders, each writing a complete
inference checkpoint (``{'model': <fp16 model>, 'ema': None, ...}``, ~140 MB) to a file:

* ``fxrewrite saver``: :func:`fxrewrite.yolov9.checkpoint.checkpoint_writer` -- a frozen fp16 copy
  (new layer objects; the fp16 cast is the only tensor copy; the caller's model is untouched),
  pickled by the C pickler with our classes renamed to their official names, through the atomic
  output file object;
* ``torch.save, same object``: ``torch.save`` of exactly the dict the saver pickles (its fp16
  copy made beforehand, outside the timing): what pickling and renaming cost on their own;
* ``notebook``: what the official reparameterization notebook does -- ``model.half()`` in place
  and ``torch.save`` to a path (on a fresh fp32 copy made outside the timing, as the notebook
  owns the model it converts).

Run: ``python -m pytest benchmarks/test_bench_save.py --benchmark-only -s``.
"""
from __future__ import annotations

import copy
import gc
import statistics
import time

import pytest
import torch

from fxrewrite.yolov9.checkpoint import _fp16_copy, checkpoint_writer, load_checkpoint, save_checkpoint
from fxrewrite.yolov9.classes import checkpoint_allow_list, official_aliases

from train_dual_checkpoint import write_training_checkpoint

ROUNDS = 7
EMPTY = {"ema": None, "optimizer": None, "updates": None, "best_fitness": None, "epoch": -1}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_training_checkpoint(tmp_path_factory.mktemp("save") / "last.pt")
    return load_checkpoint(path, mmap=False).model  # fp32, as convert hands it to the saver


def test_the_saved_files_hold_the_same_weights(model, tmp_path):
    save_checkpoint(model, tmp_path / "ours.pt")
    theirs = copy.deepcopy(model).half()
    torch.save({"model": theirs, **EMPTY}, tmp_path / "plain.pt")
    a = load_checkpoint(tmp_path / "ours.pt", dtype=None).model.state_dict()
    b = torch.load(tmp_path / "plain.pt", weights_only=False)["model"].state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.benchmark(group="save a yolov9-e model (fp32 in memory -> fp16 file), interleaved")
def test_interleaved_save(benchmark, model, tmp_path):
    official_names = {cls: name for name, cls in official_aliases().items()}
    times: dict[str, list[float]] = {"fxrewrite saver": [], "torch.save, same object": [], "notebook": []}

    def saver():
        with open(tmp_path / "ours.pt", "wb") as f:
            checkpoint_writer(model, "ours.pt")(f)

    def same_object(prepared):
        torch.save(prepared, tmp_path / "same.pt")

    def notebook(fresh):
        torch.save({"model": fresh.half(), **EMPTY}, tmp_path / "notebook.pt")

    order = list(times)

    def one_round():
        prepared = {"model": _fp16_copy(model, official_names), **EMPTY}
        fresh = copy.deepcopy(model)
        for name in order:
            gc.collect()
            start = time.perf_counter()
            if name == "fxrewrite saver":
                saver()
            elif name == "notebook":
                notebook(fresh)
            else:
                same_object(prepared)
            times[name].append(time.perf_counter() - start)
        order.reverse()

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    benchmark.extra_info.update({f"median {name}": value for name, value in medians.items()})
    print(f"\nsave yolov9-e, {ROUNDS} interleaved rounds, median seconds (ratio to the notebook):")
    for name, value in medians.items():
        print(f"  {name:25s} {value:7.3f}  {value / medians['notebook']:5.2f}x")
    stage = []
    for _ in range(5):
        start = time.perf_counter()
        _fp16_copy(model, official_names)
        stage.append(time.perf_counter() - start)
    print(f"  of which the frozen fp16 copy alone: {statistics.median(stage):.3f}")
    assert checkpoint_allow_list().names() >= set(official_names.values())
