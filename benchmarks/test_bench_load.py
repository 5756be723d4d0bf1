"""Loading a yolov9-e training checkpoint: the safe loader against torch's loaders, interleaved in one run.

The file is what ``train_dual.py`` writes mid-training (fp16 ``model`` and ``ema``, ``optimizer``
state, ``opt``, ``names``...; see ``train_dual_checkpoint.py``), 559 MB, written by the official
code so that plain ``torch.load`` resolves its classes. Contenders, all reading to CPU memory:

* ``fxrewrite``: :func:`fxrewrite.serialization.load` with the YOLOv9 allow-list (the C unpickler,
  restricted; every record's size and CRC-32 checked; the result checked to be data);
* ``fxrewrite mmap``: the same, tensors mapped from the file (as ``fxrewrite convert`` loads);
* ``load_checkpoint``: the plug-in's entry point on top (EMA picked, layer graph checked; dtype kept);
* ``torch weights_only``: what fxrewrite used before: ``torch.load(weights_only=True)`` with the
  official names as ``safe_globals`` (torch's pure-Python unpickler);
* ``torch.load``: plain ``torch.load(weights_only=False)`` with the official code importable,
  as the official notebook loads (no safety; the C unpickler) -- the reference;
* ``torch.load mmap``: the same with ``mmap=True``.

Every round runs every contender once, in an order that alternates (ABC..., ...CBA), so drifts
of a shared machine hit all alike; after the module a table of medians and of ratios to plain
``torch.load`` is printed. Run: ``python -m pytest benchmarks/test_bench_load.py --benchmark-only -s``
(target: fxrewrite within ~1.2x of plain torch.load).
"""
from __future__ import annotations

import gc
import statistics
import time

import pytest
import torch

from fxrewrite.serialization import load
from fxrewrite.yolov9.checkpoint import load_checkpoint
from fxrewrite.yolov9.classes import allowed_globals, checkpoint_allow_list, official_aliases

from train_dual_checkpoint import write_training_checkpoint

ROUNDS = 7


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_training_checkpoint(tmp_path_factory.mktemp("load") / "last.pt")


def contenders(path) -> dict[str, callable]:
    allow = checkpoint_allow_list()
    pairs = [(cls, name) for name, cls in official_aliases().items()]
    pairs += [(obj, name) for name, obj in allowed_globals().items()]

    def torch_weights_only():
        with torch.serialization.safe_globals(pairs):
            return torch.load(path, map_location="cpu", weights_only=True)

    return {
        "fxrewrite": lambda: load(path, allow),
        "fxrewrite mmap": lambda: load(path, allow, mmap=True),
        "load_checkpoint": lambda: load_checkpoint(path, dtype=None),
        "torch weights_only": torch_weights_only,
        "torch.load": lambda: torch.load(path, map_location="cpu", weights_only=False),
        "torch.load mmap": lambda: torch.load(path, map_location="cpu", weights_only=False, mmap=True),
    }


def test_what_the_loaders_return_is_equal(checkpoint):
    """Sanity for the table: the safe loader returns the same weights as plain torch.load."""
    ours, theirs = load(checkpoint, checkpoint_allow_list()), torch.load(checkpoint, weights_only=False)
    a, b = ours["ema"].state_dict(), theirs["ema"].state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.benchmark(group="load a yolov9-e training checkpoint (559 MB), interleaved")
def test_interleaved_load(benchmark, checkpoint):
    runs = contenders(checkpoint)
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)

    def one_round():
        for name in order:
            gc.collect()
            start = time.perf_counter()
            result = runs[name]()
            times[name].append(time.perf_counter() - start)
            del result
        order.reverse()

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}  # the warm-up round dropped
    benchmark.extra_info.update({f"median {name}": value for name, value in medians.items()})
    reference = medians["torch.load"]
    print(f"\nload yolov9-e training checkpoint, {ROUNDS} interleaved rounds, median seconds (ratio to torch.load):")
    for name, value in medians.items():
        print(f"  {name:20s} {value:7.3f}  {value / reference:5.2f}x")
    per_round = [a / b for a, b in zip(times["fxrewrite"][1:], times["torch.load"][1:])]
    print(f"  fxrewrite / torch.load per round: median {statistics.median(per_round):.2f}, "
          f"range {min(per_round):.2f}..{max(per_round):.2f}")
