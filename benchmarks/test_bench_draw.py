"""Benchmark: drawing at layer granularity vs at operation granularity (issue 4).

What "drawing" means here, the same on both sides: from an existing rewrite result
(or traced graph), build the :class:`~fxrewrite.draw.Drawing` (nodes, boxes, legend,
DOT source) and render it to SVG with Graphviz's ``dot`` (``Drawing.pipe("svg")``).
Tracing and rewriting are done once, in the fixtures, and are not timed.

* ``yolov9-e``: the training model traced at layer granularity (one node per
  ``model.N`` layer, what ``convert`` uses) and at op granularity (every operation:
  ``trace_and_rewrite(model, ops=True)``, what ``fxrewrite yolov9 draw --ops`` draws),
  both rewritten by ``rules/yolov9.yaml``. Drawing = ``layer_clusters`` (backbone /
  head / auxiliary boxes, plus one box per layer at op granularity) +
  ``draw_rewrite(view="overlay")`` + SVG, with the defaults: at op granularity (1,400
  nodes) dot gets iteration limits and each chain of operations (a conv -> bn -> act
  block...) is drawn as one box listing them (``fold_chains``). Target: op
  granularity in under 10x the layer-granularity time.
* ``deep``: a synthetic deep model (a Sequential of 60 small residual conv blocks),
  traced one node per block and all the way down; drawing = ``draw_graph`` + SVG.

Each granularity is one benchmark of a group (``draw yolov9-e``, ``draw deep``), so
pytest-benchmark's table shows them side by side. The summaries then measure both
granularities again, alternately (layer, op, layer, op...: both see the same load on
a shared machine), and print the best and median wall time, the best CPU time (this
process + dot: insensitive to other processes), the output sizes and the op / layer
ratios; ``test_yolov9e_summary`` checks the ratio. Run with ``-s`` to see them::

    OMP_NUM_THREADS=1 python -m pytest benchmarks/test_bench_draw.py -s
"""
from __future__ import annotations

import shutil
import statistics
import time

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite.draw import draw_graph, draw_rewrite

try:
    import resource
except ImportError:  # Windows: the CPU time is then this process's only
    resource = None

pytestmark = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")

BLOCKS = 60
ROUNDS = 7
MAX_RATIO = 10  # issue 4: op-granularity drawing of yolov9-e in under 10x the layer-granularity time


def _children_cpu() -> float:
    if resource is None:
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _draw_and_render(draw):
    """One drawing: build it with ``draw()``, render it to SVG; wall and CPU seconds (Python + dot)."""
    cpu, children, start = time.process_time(), _children_cpu(), time.perf_counter()
    drawing = draw()
    svg = drawing.pipe("svg")
    wall = time.perf_counter() - start
    return drawing, svg, wall, time.process_time() - cpu + _children_cpu() - children


def _bench(draw, benchmark) -> None:
    _draw_and_render(draw)  # warm-up, not counted: imports, caches, dot's plugins and fonts
    drawing, svg, _, _ = benchmark.pedantic(lambda: _draw_and_render(draw), rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(_sizes(drawing, svg))


def _sizes(drawing, svg: bytes) -> dict[str, int]:
    return {"nodes": len(drawing.statuses),  # graph nodes drawn
            "boxes": len(drawing.statuses) - sum(len(m) - 1 for m in drawing.chains.values()),  # what dot lays out
            "clusters": len({box for box in drawing.clusters.values() if box}),
            "dot_bytes": len(drawing.source.encode()), "svg_bytes": len(svg)}


def _compare(draws: dict[str, object]) -> dict[str, dict[str, float]]:
    """Draw each granularity ``ROUNDS`` times, alternately; best / median wall, best CPU, sizes."""
    walls: dict[str, list[float]] = {g: [] for g in draws}
    cpus: dict[str, list[float]] = {g: [] for g in draws}
    sizes: dict[str, dict[str, int]] = {}
    for draw in draws.values():
        _draw_and_render(draw)  # warm-up
    for _ in range(ROUNDS):
        for granularity, draw in draws.items():
            drawing, svg, wall, cpu = _draw_and_render(draw)
            walls[granularity].append(wall)
            cpus[granularity].append(cpu)
            sizes[granularity] = _sizes(drawing, svg)
    return {g: {**sizes[g], "best": min(walls[g]), "median": statistics.median(walls[g]), "cpu": min(cpus[g])}
            for g in draws}


def _summary(title: str, r: dict[str, dict[str, float]]) -> str:
    layer, op = r["layer"], r["op"]
    lines = [f"{title}, layer vs op granularity, {ROUNDS} rounds each, alternately",
             "  nodes: graph nodes drawn; boxes: node boxes dot lays out (a folded chain is one);",
             "  wall: best and median; cpu: best, this process + dot",
             f"{'':11}{'nodes':>7}{'boxes':>7}{'clusters':>9}{'wall s':>8}{'median s':>10}{'cpu s':>8}"
             f"{'DOT KiB':>9}{'SVG KiB':>9}"]
    for name, x in (("layer", layer), ("op", op)):
        lines.append(f"{name:11}{x['nodes']:>7}{x['boxes']:>7}{x['clusters']:>9}{x['best']:>8.3f}{x['median']:>10.3f}"
                     f"{x['cpu']:>8.3f}{x['dot_bytes'] / 1024:>9.1f}{x['svg_bytes'] / 1024:>9.1f}")
    ratio = {k: op[k] / layer[k] if layer[k] else float("nan")
             for k in ("nodes", "boxes", "best", "median", "cpu", "dot_bytes", "svg_bytes")}
    lines.append(f"{'op / layer':11}{ratio['nodes']:>7.1f}{ratio['boxes']:>7.1f}{'':>9}{ratio['best']:>8.1f}"
                 f"{ratio['median']:>10.1f}{ratio['cpu']:>8.1f}{ratio['dot_bytes']:>9.1f}{ratio['svg_bytes']:>9.1f}")
    return "\n".join(lines)


# -- a synthetic deep model -------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """conv-bn-silu-conv-bn, plus the input, then silu: 7 operations when traced through."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


@pytest.fixture(scope="module")
def deep_draws():
    torch.manual_seed(0)
    model = nn.Sequential(*[ResBlock(8) for _ in range(BLOCKS)]).eval()
    x = torch.zeros(1, 8, 8, 8)
    graphs = {"layer": fxrewrite.trace(model, x, max_depth=1), "op": fxrewrite.trace(model, x)}
    return {g: (lambda gm=gm: draw_graph(gm)) for g, gm in graphs.items()}


@pytest.mark.benchmark(group="draw deep")
@pytest.mark.parametrize("granularity", ["layer", "op"])
def test_draw_deep_model(benchmark, deep_draws, granularity):
    _bench(deep_draws[granularity], benchmark)


def test_deep_summary(deep_draws):
    r = _compare(deep_draws)
    print("\n" + _summary("deep (60 residual blocks): draw_graph + dot -Tsvg", r))
    assert r["layer"]["nodes"] == BLOCKS + 2 and r["op"]["nodes"] > 5 * BLOCKS
    assert r["op"]["svg_bytes"] > 3 * r["layer"]["svg_bytes"]


# -- YOLOv9-e ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def yolov9e_draws():
    """Not timed: build yolov9-e, trace it at both granularities and rewrite it."""
    from fxrewrite.yolov9 import DetectionModel
    from fxrewrite.yolov9.convert import trace_and_rewrite
    from fxrewrite.yolov9.drawing import layer_clusters

    torch.manual_seed(0)
    model = DetectionModel("yolov9-e").eval()
    results = {"layer": trace_and_rewrite(model), "op": trace_and_rewrite(model, ops=True)}
    return {g: (lambda result=result: draw_rewrite(result, clusters=layer_clusters(result, model.yaml)))
            for g, result in results.items()}


@pytest.mark.benchmark(group="draw yolov9-e")
@pytest.mark.parametrize("granularity", ["layer", "op"])
def test_draw_yolov9e(benchmark, yolov9e_draws, granularity):
    _bench(yolov9e_draws[granularity], benchmark)


def test_yolov9e_summary(yolov9e_draws):
    r = _compare(yolov9e_draws)
    print("\n" + _summary("yolov9-e: layer_clusters + draw_rewrite + dot -Tsvg", r))
    layer, op = r["layer"], r["op"]
    assert op["nodes"] > 10 * layer["nodes"]
    # CPU time: what the drawing costs, whatever else runs on the machine (the wall-time ratio is printed)
    assert op["cpu"] / layer["cpu"] < MAX_RATIO, "op-granularity drawing costs 10x the layer drawing or more"
