"""Drawings of a YOLOv9 rewrite: backbone / head / auxiliary boxes, one box per layer at op granularity."""
from __future__ import annotations


import pytest
import torch

from fxrewrite.draw import draw_rewrite
from helpers.graphviz import needs_dot
from fxrewrite.yolov9 import DetectionModel
from fxrewrite.yolov9.convert import trace_and_rewrite
from fxrewrite.yolov9.drawing import AUXILIARY, BACKBONE, HEAD, layer_clusters, layer_of


@pytest.fixture(scope="module")
def yolov9_t():
    torch.manual_seed(0)
    model = DetectionModel("yolov9-t").eval()
    return model, {"layer": trace_and_rewrite(model), "op": trace_and_rewrite(model, ops=True)}


def test_layer_granularity_boxes_are_the_sections(yolov9_t):
    model, results = yolov9_t
    boxes = layer_clusters(results["layer"], model.yaml)
    assert set(boxes.values()) == {BACKBONE, HEAD, AUXILIARY}
    assert boxes == layer_clusters(results["layer"], model.yaml, layers=True)  # one node per layer: no layer boxes


def test_op_granularity_nests_a_box_per_layer_in_its_section(yolov9_t):
    model, results = yolov9_t
    result = results["op"]
    boxes = layer_clusters(result, model.yaml)
    nodes = {n.name: n for n in result.original.graph.nodes}
    assert boxes["model_1_conv"] == (BACKBONE, "model.1")
    for name, box in boxes.items():
        if isinstance(box, tuple) and name in nodes:
            assert box[0] in (BACKBONE, HEAD, AUXILIARY) and box[1] == f"model.{layer_of(nodes[name])}"
    layers = {box[1] for box in boxes.values() if isinstance(box, tuple)}
    assert len(layers) > 10
    # a layer that is a single operation (a Concat) has no box of its own
    single = [name for name, box in boxes.items() if isinstance(box, str)]
    assert single and all(sum(layer_of(nodes[n]) == layer_of(nodes[s]) for n in nodes) == 1
                          for s in single if s in nodes)
    # the auxiliary layers' operations are all pruned
    assert all(result.node_status[name] == "pruned" for name, box in boxes.items()
               if (box if isinstance(box, str) else box[0]) == AUXILIARY)
    flat = layer_clusters(result, model.yaml, layers=False)
    assert set(flat.values()) == {BACKBONE, HEAD, AUXILIARY}


def test_op_granularity_drawing_has_layer_boxes_and_folded_chains(yolov9_t):
    model, results = yolov9_t
    result = results["op"]
    drawing = draw_rewrite(result, clusters=layer_clusters(result, model.yaml))
    assert drawing.clusters["model_1_conv"] == (BACKBONE, "model.1")
    assert 'id="cluster:backbone/model.1"' in drawing.source
    assert drawing.chains["model_1_conv"] == ["model_1_conv", "model_1_bn", "model_1_act"]
    operations = {n.name for n in result.original.graph.nodes if n.op != "placeholder"}
    assert operations <= set(drawing.statuses)  # folded or not, every operation is drawn


@needs_dot
def test_op_granularity_drawing_renders(yolov9_t):
    model, results = yolov9_t
    result = results["op"]
    svg = draw_rewrite(result, clusters=layer_clusters(result, model.yaml)).svg()
    assert "model.1" in svg and "RepNCSPELAN4" in svg and "model_1_bn" in svg
