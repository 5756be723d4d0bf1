"""What users feel: ``fxrewrite convert IN -o OUT`` against the official notebook's method, whole processes.

Two rows per model (yolov9-c and yolov9-e), each measured side by side in one run:

* **whole process**: a fresh ``fxrewrite convert IN -o OUT`` process against a fresh
  ``python benchmarks/notebook_method.py IN OUT`` process (the notebook's cells as a script, the
  official code importable, plain ``torch.load``; see that file), interleaved A, B, B, A in every
  round; wall time and peak memory (``ru_maxrss`` of each child) per process; a third process
  per round, ``python -c "import torch"``, gives the floor any torch program pays;
* **conversion stage**: in one process, after imports and loading: ``fxrewrite.yolov9.convert``
  of the loaded training model against the notebook's build-and-copy (the official ``Model`` built
  from ``gelan-X.yaml``, every tensor copied through the notebook's index map), interleaved; each
  call starts from a collected heap (an untimed ``gc.collect()``) and ends with a timed
  collection of the young generations (``gc.collect(1)``), so that each side pays for collecting
  its own new objects and neither for the other's (fxrewrite pauses the collector while it
  converts: without that collection its garbage would be collected outside its time).

The input is what users convert: ``best.pt`` as ``train_dual.py`` leaves it at the end of
training (``strip_optimizer``: the EMA weights as fp16 ``model``, no optimizer), written by the
official code. ``test_bench_convert.py`` keeps the third row (both methods with fxrewrite's own
loader and saver). Run: ``python -m pytest benchmarks/test_bench_e2e.py --benchmark-only -s``
(targets: whole process <= 0.6x the notebook, conversion stage <= 0.25x, peak memory <= the notebook's).
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train_dual_checkpoint import write_training_checkpoint

import notebook_method

NOTEBOOK_SCRIPT = Path(notebook_method.__file__).resolve()
ROUNDS = 4  # ABBA rounds per model: 8 processes on each side
STAGE_ROUNDS = 10  # ABBA rounds of the conversion stage (after one warm-up round): 20 calls on each side
VARIANTS = ("c", "e")


def strip_optimizer(path: Path, out: Path) -> Path:
    """What ``train_dual.py`` does to ``best.pt`` at the end (the official ``strip_optimizer``)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("ema"):
        ckpt["model"] = ckpt["ema"]
    for key in ("optimizer", "best_fitness", "ema", "updates"):
        ckpt[key] = None
    ckpt["epoch"] = -1
    ckpt["model"].half()
    for p in ckpt["model"].parameters():
        p.requires_grad = False
    torch.save(ckpt, out)
    return out


@pytest.fixture(scope="module")
def best_pt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e")
    found = {}
    for variant in VARIANTS:
        last = write_training_checkpoint(folder / f"last-{variant}.pt", cfg=f"yolov9-{variant}.yaml")
        found[variant] = strip_optimizer(last, folder / f"best-{variant}.pt")
        last.unlink()
    return found


def _fxrewrite_command(src: Path, out: Path) -> list[str]:
    script = shutil.which("fxrewrite", path=os.path.dirname(sys.executable)) or shutil.which("fxrewrite")
    head = [script] if script else [sys.executable, "-m", "fxrewrite.cli"]
    return head + ["convert", str(src), "-o", str(out), "--force"]


# The least a process that uses torch takes: the interpreter starting and importing torch, nothing else.
FLOOR = [sys.executable, "-c", "import torch"]


def _notebook_command(src: Path, out: Path, variant: str) -> list[str]:
    return [sys.executable, str(NOTEBOOK_SCRIPT), str(src), str(out), "--variant", variant]


# Runs the command as a grandchild and reports its peak memory. Linux keeps a process's RSS high-water
# mark across fork and exec, so a child forked straight from this (large) pytest process would report
# at least this process's size; forked from a small fresh interpreter, it reports its own.
_MEASURE = (
    "import os, resource, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "_, status = os.waitpid(pid, 0)\n"
    "sys.stderr.write('\\npeak-kb %d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_process(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MB) of one fresh process; fails on a non-zero exit."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURE, *command], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}"
    peak_kb = int(done.stderr.rsplit("peak-kb ", 1)[1].split()[0])
    return elapsed, peak_kb / 1024


def _table_line(name: str, a: list[float], b: list[float], unit: str) -> str:
    ma, mb = statistics.median(a), statistics.median(b)
    return f"  {name:34s} fxrewrite {ma:8.2f} {unit}  notebook {mb:8.2f} {unit}  ratio {ma / mb:5.2f}x"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.benchmark(group="whole process: fxrewrite convert vs the notebook's method (best.pt)")
def test_whole_process(benchmark, best_pt, variant, tmp_path):
    src = best_pt[variant]
    ours, theirs = _fxrewrite_command(src, tmp_path / "fx.pt"), _notebook_command(src, tmp_path / "nb.pt", variant)
    times = {"fxrewrite": [], "notebook": [], "floor": []}
    memory = {"fxrewrite": [], "notebook": [], "floor": []}
    ratios = []

    def abba():
        pair = {}
        for name, command in (("fxrewrite", ours), ("notebook", theirs), ("floor", FLOOR), ("notebook", theirs),
                              ("fxrewrite", ours)):
            seconds, peak = run_process(command)
            times[name].append(seconds)
            memory[name].append(peak)
            pair[name] = pair.get(name, 0.0) + seconds
        ratios.append(pair["fxrewrite"] / pair["notebook"])

    benchmark.pedantic(abba, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({"time ratio median": statistics.median(ratios), "time ratios": ratios,
                                 "peak MB fxrewrite": statistics.median(memory["fxrewrite"]),
                                 "peak MB notebook": statistics.median(memory["notebook"])})
    print(f"\nyolov9-{variant} best.pt ({src.stat().st_size / 2**20:.0f} MB), {ROUNDS} ABBA rounds:")
    print(_table_line("whole process, median", times["fxrewrite"], times["notebook"], "s"))
    print(f"  {'interleaved ratio (A+A)/(B+B)':34s} median {statistics.median(ratios):.2f}x, "
          f"range {min(ratios):.2f}..{max(ratios):.2f}")
    print(_table_line("peak memory, median", memory["fxrewrite"], memory["notebook"], "MB"))
    floor, notebook = statistics.median(times["floor"]), statistics.median(times["notebook"])
    label = "floor: python -c 'import torch'"
    print(f"  {label:34s} {floor:8.2f} s = {floor / notebook:.2f}x the notebook "
          "(what any torch program pays before its first line of work)")
    benchmark.extra_info["floor ratio"] = floor / notebook


def notebook_stage(official_training, variant: str):
    """The notebook between loading and saving: build gelan-X with the official code, copy by index."""
    from helpers.official import official

    off = official()
    model = off.yolo.Model(str(off.cfg(f"gelan-{variant}.yaml")), ch=3, nc=80, anchors=3).eval()
    model.names, model.nc = official_training.names, official_training.nc
    source = official_training.state_dict()
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            tensor -= tensor
            tensor += source[notebook_method.training_key(key, variant)]
    return model


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.benchmark(group="conversion stage: loaded training model -> inference model")
def test_conversion_stage(benchmark, best_pt, variant):
    from helpers.official import official

    from fxrewrite.yolov9 import convert
    from fxrewrite.yolov9.checkpoint import load_checkpoint

    official()  # the official classes importable, as in the notebook
    src = best_pt[variant]
    ours = load_checkpoint(src, dtype=None).model  # as `fxrewrite convert` loads: the weights as stored
    theirs = torch.load(src, map_location="cpu", weights_only=False)["model"].float()  # as the notebook's copy reads
    times = {"fxrewrite": [], "notebook": []}
    ratios = []

    def timed(name, fn):
        gc.collect()  # untimed: each call starts from a collected heap, so neither side pays for the other's garbage
        start = time.perf_counter()
        fn()
        gc.collect(1)  # timed: each side pays for collecting its own new objects (fxrewrite pauses the collector)
        times[name].append(time.perf_counter() - start)
        return times[name][-1]

    def abba():
        a = timed("fxrewrite", lambda: convert(ours))
        b = timed("notebook", lambda: notebook_stage(theirs, variant)) + timed("notebook", lambda: notebook_stage(theirs, variant))
        a += timed("fxrewrite", lambda: convert(ours))
        ratios.append(a / b)

    benchmark.pedantic(abba, rounds=STAGE_ROUNDS + 1, iterations=1, warmup_rounds=1)
    measured = ratios[1:] if len(ratios) > 1 else ratios
    benchmark.extra_info.update({"ratio median": statistics.median(measured), "ratios": measured})
    print(f"\nyolov9-{variant}, conversion stage, interleaved:")
    print(_table_line("stage, median", times["fxrewrite"][2:], times["notebook"][2:], "s"))
    print(f"  {'interleaved ratio':34s} median {statistics.median(measured):.2f}x, "
          f"range {min(measured):.2f}..{max(measured):.2f}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_both_methods_write_the_same_weights(best_pt, variant, tmp_path):
    """The benchmark compares equals: both outputs hold exactly the same fp16 tensors."""
    from helpers.official import official

    official()
    src = best_pt[variant]
    run_process(_fxrewrite_command(src, tmp_path / "fx.pt"))
    run_process(_notebook_command(src, tmp_path / "nb.pt", variant))
    a = torch.load(tmp_path / "fx.pt", weights_only=False)["model"].state_dict()
    b = torch.load(tmp_path / "nb.pt", weights_only=False)["model"].state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
