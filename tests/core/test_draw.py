"""Drawings of rewrites (fxrewrite.draw): DOT and SVG content, clusters, legend, parameter table, files.

The assertions read the generated DOT source and the SVG Graphviz renders from it
(node ids, fill colours, cluster geometry), and decode one PNG.
"""
from __future__ import annotations

import argparse
import re
import shutil
import struct
import xml.etree.ElementTree as ET
import zlib

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite import Pattern, Rule
from helpers.graphviz import needs_dot
from fxrewrite.draw import (STATUS_STYLES, Drawing, draw_graph, draw_rewrite, format_shape, param_rows,
                            write_rewrite_drawings)
from fxrewrite.engine import COLLAPSED, KEPT, NEW, PRUNED, REPLACED
from fxrewrite.errors import DrawError, FxRewriteError, GraphvizMissing
from fxrewrite.examples import DEMO_RULES, aux_branch_model

SVG = "{http://www.w3.org/2000/svg}"
XLINK_TITLE = "{http://www.w3.org/1999/xlink}title"

AUX_NODES = {"aux_0_conv", "aux_0_bn", "aux_0_act", "aux_1_conv", "aux_1_bn", "aux_1_act", "mean_1", "aux_head_fc"}


# -- models and rewrites ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    model = aux_branch_model()
    gm = fxrewrite.trace(model, torch.zeros(1, 3, 32, 32))
    return fxrewrite.rewrite(gm, fxrewrite.load_rules(DEMO_RULES))


class Dual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        return self.a(x) + self.b(x)


class Single(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x):
        return self.proj(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.act, self.head = nn.Linear(6, 8), nn.ReLU(), Dual()

    def forward(self, x):
        return self.head(self.act(self.inp(x)))


def _insert_tanh(ctx, match):
    node = match.root
    with ctx.graph.inserting_after(node):
        new = ctx.graph.call_function(torch.tanh, (node,))
    node.replace_all_uses_with(new)
    new.args = (node,)
    ctx.note_new(new, like=node)


fxrewrite.register_module_class(Single, "TestDrawSingle")
fxrewrite.register_action("test_draw_insert_tanh")(_insert_tanh)


@pytest.fixture(scope="module")
def swapped():
    """A ``replace`` (Dual -> Single, re-binding b.* as proj.*) and a rule that adds a node."""
    gm = fxrewrite.trace(Net(), torch.zeros(2, 6), leaf_classes=["Dual"])
    rules = [Rule("dual-to-single", "replace", Pattern(module_class="Dual"),
                  args={"with": "TestDrawSingle", "params": {"b": "proj"}}),
             Rule("tanh-after-relu", "test_draw_insert_tanh", Pattern(module_class="ReLU"))]
    return fxrewrite.rewrite(gm, rules)


# -- helpers: read the SVG ----------------------------------------------------------------------------
def _svg(drawing: Drawing) -> ET.Element:
    return ET.fromstring(drawing.svg())


def _shape_element(group: ET.Element) -> ET.Element:
    return next(e for e in group.iter() if e.tag in (SVG + "path", SVG + "polygon", SVG + "ellipse"))


def _nodes(root: ET.Element) -> dict[str, ET.Element]:
    """SVG node id (the <title>) -> its <g> element."""
    return {g.find(SVG + "title").text: g for g in root.iter(SVG + "g")
            if "node" in (g.get("class") or "").split()}


def _fill(group: ET.Element) -> str:
    return _shape_element(group).get("fill").upper()


def _bbox(element: ET.Element) -> tuple[float, float, float, float]:
    text = element.get("d") or element.get("points")
    xs_ys = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", text)]
    xs, ys = xs_ys[0::2], xs_ys[1::2]
    return min(xs), min(ys), max(xs), max(ys)


def _clusters(root: ET.Element) -> dict[str, tuple[float, float, float, float]]:
    """Cluster id (``cluster:<prefix><label>``) -> bounding box."""
    return {g.get("id"): _bbox(_shape_element(g)) for g in root.iter(SVG + "g")
            if "cluster" in (g.get("class") or "").split() and (g.get("id") or "").startswith("cluster:")}


def _inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _text(group: ET.Element) -> str:
    return " ".join(t.text or "" for t in group.iter(SVG + "text"))


# -- DOT source (no Graphviz needed) -------------------------------------------------------------------
def _dot_node_line(source: str, node_id: str) -> str:
    match = re.search(rf'^\s*"?{re.escape(node_id)}"? \[label=.*$', source, re.M)
    assert match, f"node {node_id} not in the DOT source"
    return match.group(0)


def test_overlay_source_has_every_node_with_its_status_colour(demo):
    drawing = draw_rewrite(demo)
    src = drawing.source
    for name, status in demo.node_status.items():
        line = _dot_node_line(src, name)
        assert f'fillcolor="{STATUS_STYLES[status].fill}"' in line or name in ("x", "output"), name
        assert f"status-{status}" in line
    assert set(drawing.nodes_with_status(PRUNED)) == AUX_NODES
    assert drawing.nodes_with_status(COLLAPSED) == ["main_1"]
    # labels: name, module class or function/method, output shape
    assert "<B>stem_conv</B>" in _dot_node_line(src, "stem_conv")
    assert "Conv2d" in _dot_node_line(src, "stem_conv") and "1×16×16×16" in _dot_node_line(src, "stem_conv")
    assert ".mean()" in _dot_node_line(src, "mean")
    assert "pruned" in _dot_node_line(src, "aux_0_conv")  # the status is written, not only coloured


def test_overlay_edges_mark_dropped_and_added(demo):
    src = draw_rewrite(demo).source
    dropped = re.findall(r'"?(\w+)"? -> "?(\w+)"? \[[^\]]*edge-dropped', src)
    added = re.findall(r'"?(\w+)"? -> "?(\w+)"? \[[^\]]*edge-added', src)
    assert ("main_0_act", "main_1") in dropped and ("main_1", "main_2_conv") in dropped
    assert ("stem_act", "aux_0_conv") in dropped and ("aux_head_fc", "output") in dropped
    assert added == [("main_0_act", "main_2_conv")]


def test_edge_shapes_option(demo):
    without = draw_rewrite(demo).source
    with_shapes = draw_rewrite(demo, edge_shapes=True).source
    edge = re.search(r'stem_conv -> stem_bn \[.*\]', with_shapes).group(0)
    assert 'label=" 1×16×16×16"' in edge
    assert 'label=" 1×16×16×16"' not in without


def test_no_shapes_option(demo):
    src = draw_rewrite(demo, shapes=False).source
    label = _dot_node_line(src, "stem_conv").split(" class=")[0]
    assert "Conv2d" in label and "1×16×16×16" not in label
    assert "output: 1×16×16×16" in src  # the tooltip still has it


def test_after_view_has_only_surviving_nodes(demo):
    drawing = draw_rewrite(demo, view="after")
    assert set(drawing.statuses) == {n.name for n in demo.module.graph.nodes}
    assert not AUX_NODES & set(drawing.statuses) and "main_1" not in drawing.statuses
    assert re.search(r'main_0_act -> main_2_conv \[[^\]]*edge-added', drawing.source)


def test_before_view_has_the_original_graph(demo):
    drawing = draw_rewrite(demo, view="before")
    assert set(drawing.statuses) == {n.name for n in demo.original.graph.nodes}
    assert "edge-added" not in drawing.source


def test_default_clusters_follow_the_first_module_path_component(demo):
    drawing = draw_rewrite(demo)
    assert drawing.clusters["aux_0_conv"] == ("aux",)
    assert drawing.clusters["main_1"] == ("main",)
    assert drawing.clusters["mean"] == ("main_head",)  # a method call inside Head.forward
    assert drawing.clusters["x"] == () and drawing.clusters["output"] == ()
    assert 'label=<<B>aux</B>  <FONT COLOR="#5F5F5F">Sequential</FONT>>' in drawing.source


def test_cluster_depth_nests_boxes(demo):
    drawing = draw_rewrite(demo, clusters=2)
    assert drawing.clusters["main_0_conv"] == ("main", "main.0")
    assert drawing.clusters["main_1"] == ("main",)  # the Identity is a call of main.1 itself: no box of its own
    assert drawing.clusters["mean"] == ("main_head",)


def test_caller_clusters_mapping_and_callable(demo):
    groups = {"stem_conv": "backbone", "stem_bn": "backbone", "stem_act": "backbone",
              **{n: "auxiliary" for n in AUX_NODES}}
    drawing = draw_rewrite(demo, clusters=groups, title="my plug-in")
    assert drawing.clusters["stem_bn"] == ("backbone",) and drawing.clusters["aux_1_bn"] == ("auxiliary",)
    assert drawing.clusters["main_0_conv"] == ()
    assert "my plug-in" in drawing.source
    by_function = draw_rewrite(demo, clusters=lambda n: ("model", "head") if "head" in n.name else None)
    assert by_function.clusters["main_head_fc"] == ("model", "head")
    assert by_function.clusters["stem_conv"] == ()
    assert "cluster" not in draw_rewrite(demo, clusters=False).source


def test_layer_granularity_graph_has_no_boxes():
    gm = fxrewrite.trace(aux_branch_model(), torch.zeros(1, 3, 32, 32), max_depth=1)
    drawing = draw_graph(gm)
    assert [n.name for n in gm.graph.nodes] == list(drawing.statuses)
    assert "subgraph cluster" not in drawing.source
    assert "ConvBlock" in _dot_node_line(drawing.source, "stem")
    assert all(s is None for s in drawing.statuses.values())
    assert "legend" not in drawing.source  # a plain graph has no statuses to explain


def test_replaced_and_new_nodes(swapped):
    assert swapped.node_status["head"] == REPLACED and swapped.node_status["tanh"] == NEW
    src = draw_rewrite(swapped).source
    head = _dot_node_line(src, "head")
    assert f'fillcolor="{STATUS_STYLES[REPLACED].fill}"' in head
    assert re.search(r"Dual <FONT[^>]*>→</FONT> Single<", head)  # old class -> new class
    tanh = _dot_node_line(src, "tanh")
    assert f'fillcolor="{STATUS_STYLES[NEW].fill}"' in tanh and "NEW" in tanh
    assert re.search(r'act -> tanh \[[^\]]*edge-added', src) and re.search(r'act -> head \[[^\]]*edge-dropped', src)


def test_param_table_rows_per_tensor(swapped):
    src = draw_rewrite(swapped, param_table=True).source
    assert "parameter map (4 tensors)" in src
    row = re.search(r"<TR><TD ALIGN=\"LEFT\">head\.proj\.weight</TD>.*?</TR>", src).group(0)
    assert "<B>head.b.weight</B>" in row and "4×8" in row  # renamed tensors stand out in bold
    assert re.search(r"<TR><TD ALIGN=\"LEFT\">inp\.bias</TD>.*inp\.bias.*>8<", src)
    assert "parameter map" not in draw_rewrite(swapped).source


def test_param_table_one_row_per_module(demo):
    rows = param_rows(demo.param_map, {k: tuple(v.shape) for k, v in demo.module.state_dict().items()}, "module")
    assert ("stem.conv.*", "stem.conv.*", "weight 16×3×3×3") in rows
    assert ("main.2.bn.*", "main.2.bn.*", "weight 32 +4 more") in rows
    assert len(rows) == 7  # one per module with tensors, instead of 20 tensors
    src = draw_rewrite(demo, param_table="module").source
    assert src.count("<TR><TD ALIGN=\"LEFT\">") == 7
    renamed = param_rows({"m.proj.weight": "m.b.weight", "m.proj.bias": "m.b.bias", "m.extra": None},
                         {"m.proj.weight": (4, 8)}, "module")
    assert ("m.proj.*", "m.b.*", "weight 4×8 +1 more") in renamed and ("m.extra", None, "") in renamed


def test_param_table_is_capped(demo):
    src = draw_rewrite(demo, param_table=True, max_table_rows=5).source
    assert "… 15 more rows" in src


def test_format_shape():
    assert format_shape((1, 3, 8, 8)) == "1×3×8×8"
    assert format_shape(((1, 10), (1, 10))) == "[1×10, 1×10]"
    assert format_shape([(1,), (2,), (3,), (4,)]) == "[1, 2, 3, +1]"
    assert format_shape(()) == "scalar" and format_shape(None) is None


def test_bad_arguments(demo):
    with pytest.raises(ValueError, match="view must be one of"):
        draw_rewrite(demo, view="sideways")
    with pytest.raises(ValueError, match="rankdir"):
        draw_rewrite(demo, rankdir="XY")
    assert "rankdir=LR" in draw_rewrite(demo, rankdir="LR").source
    assert draw_rewrite(demo, view="diff").source == draw_rewrite(demo).source


# -- rendered SVG --------------------------------------------------------------------------------------
@needs_dot
def test_svg_fill_colours_per_status(demo):
    nodes = _nodes(_svg(draw_rewrite(demo)))
    assert set(nodes) == set(demo.node_status)
    for name in AUX_NODES:
        assert _fill(nodes[name]) == STATUS_STYLES[PRUNED].fill
        assert "status-pruned" in nodes[name].get("class")
    assert _fill(nodes["main_1"]) == STATUS_STYLES[COLLAPSED].fill
    for name in ("stem_conv", "main_2_conv", "main_head_fc", "mean"):
        assert _fill(nodes[name]) == STATUS_STYLES[KEPT].fill
    assert "Identity" in _text(nodes["main_1"]) and "collapsed" in _text(nodes["main_1"])


@needs_dot
def test_svg_replaced_and_new_fills(swapped):
    nodes = _nodes(_svg(draw_rewrite(swapped)))
    assert _fill(nodes["head"]) == STATUS_STYLES[REPLACED].fill
    assert _fill(nodes["tanh"]) == STATUS_STYLES[NEW].fill


@needs_dot
def test_svg_clusters_hold_their_nodes_and_do_not_overlap(demo):
    root = _svg(draw_rewrite(demo, clusters=2))
    nodes, boxes = _nodes(root), _clusters(root)
    assert {"cluster:aux", "cluster:main", "cluster:main.0", "cluster:main.2", "cluster:stem"} <= set(boxes)
    for name in ("aux_0_conv", "aux_1_act"):
        assert _inside(_bbox(_shape_element(nodes[name])), boxes["cluster:aux"])
    assert _inside(_bbox(_shape_element(nodes["main_0_bn"])), boxes["cluster:main.0"])
    assert _inside(boxes["cluster:main.0"], boxes["cluster:main"])
    assert not _inside(_bbox(_shape_element(nodes["main_1"])), boxes["cluster:main.0"])
    assert not _inside(_bbox(_shape_element(nodes["stem_conv"])), boxes["cluster:aux"])
    top = [boxes[k] for k in ("cluster:stem", "cluster:main", "cluster:aux", "cluster:main_head", "cluster:aux_head")]
    assert not any(_overlap(a, b) for i, a in enumerate(top) for b in top[i + 1:])


@needs_dot
def test_svg_legend_and_title(demo):
    svg = draw_rewrite(demo, title="Aux branch removed").svg()
    for text in ("Aux branch removed", "legend", "kept (13)", "pruned (8)", "collapsed (1)", "replaced (0)",
                 "new (0)", "edge dropped", "edge added"):
        assert text in svg, text
    default = _text(_svg(draw_rewrite(demo)))
    assert "AuxBranchNet: rewrite" in default and "rules: keep-main-output, drop-identity" in default


@needs_dot
def test_svg_param_table(swapped):
    svg = draw_rewrite(swapped, param_table=True).svg()
    for text in ("new name", "original name", "head.proj.weight", "head.b.weight", "inp.weight", "8×6"):
        assert f">{text}<" in svg, text


@needs_dot
def test_side_by_side_puts_before_left_of_after(demo):
    drawing = draw_rewrite(demo, view="side_by_side", param_table="module")
    assert "before/aux_0_conv" in drawing.statuses and "after/aux_0_conv" not in drawing.statuses
    assert drawing.statuses["after/main_2_conv"] == KEPT
    root = _svg(drawing)
    nodes = _nodes(root)
    assert _fill(nodes["before/aux_0_conv"]) == STATUS_STYLES[PRUNED].fill
    views = {g.get("class"): _bbox(_shape_element(g)) for g in root.iter(SVG + "g")
             if "fx-view" in (g.get("class") or "")}
    before, after = views["cluster fx-view view-before"], views["cluster fx-view view-after"]
    assert before[2] < after[0]  # before entirely left of after
    assert _inside(_bbox(_shape_element(nodes["before/x"])), before)
    assert _inside(_bbox(_shape_element(nodes["after/output"])), after)


@needs_dot
def test_tooltips_carry_provenance(swapped):
    nodes = _nodes(_svg(draw_rewrite(swapped)))
    link = next(e for e in nodes["tanh"].iter() if e.get(XLINK_TITLE))
    assert "rules: tanh-after-relu" in link.get(XLINK_TITLE) and "status: new" in link.get(XLINK_TITLE)


# -- files ---------------------------------------------------------------------------------------------
def _png_info(data: bytes, max_rows: int = 320) -> tuple[int, int, set]:
    """Width, height and the distinct pixels (of the first ``max_rows`` rows, every other pixel)
    of an 8-bit non-interlaced PNG, decoded with zlib and the PNG row filters."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR"
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8 and interlace == 0
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride, prev, pixels = width * bpp, bytearray(width * bpp), set()
    for y in range(min(height, max_rows)):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        if y % 2 == 0:
            pixels.update(bytes(line[i:i + bpp]) for i in range(0, stride, bpp * 2))
        prev = line
    return width, height, pixels


@needs_dot
def test_png_is_a_real_picture(demo, tmp_path):
    path = draw_rewrite(demo, param_table="module").save(tmp_path / "demo.png")
    data = path.read_bytes()
    width, height, pixels = _png_info(data)
    assert width > 100 and height > 100
    assert len(pixels) > 20  # white, text, fills, greys, anti-aliasing... not a blank canvas
    assert len(data) > 20_000
    fills = {bytes(int(STATUS_STYLES[s].fill[i:i + 2], 16) for i in (1, 3, 5)) for s in (PRUNED, COLLAPSED)}
    assert all(any(p[:3] == f for p in pixels) for f in fills)


@needs_dot
def test_save_by_suffix_and_atomically(demo, tmp_path):
    drawing = draw_rewrite(demo)
    svg = drawing.save(tmp_path / "d.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "aux_0_conv" in svg
    assert (tmp_path / "d.gv").exists() is False
    assert drawing.save(tmp_path / "d.gv").read_text() == drawing.source
    assert drawing.save(tmp_path / "sub" / "d.dot").read_text() == drawing.source  # creates the folder
    assert drawing.save(tmp_path / "noext", format="svg").read_text().count("<svg") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.gv", "d.svg", "noext", "sub"]  # no temp files left


def test_unknown_suffix(demo, tmp_path):
    with pytest.raises(DrawError, match="unknown format 'docx'"):
        draw_rewrite(demo).save(tmp_path / "d.docx")
    assert not list(tmp_path.iterdir())


def test_failed_render_leaves_no_file(demo, tmp_path, monkeypatch):
    drawing = draw_rewrite(demo)
    (tmp_path / "keep.svg").write_text("old")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("fxrewrite.draw.os.replace", broken)
    with pytest.raises(OSError, match="disk full"):
        drawing.save(tmp_path / "keep.svg" if shutil.which("dot") else tmp_path / "keep.dot")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.svg"] and (tmp_path / "keep.svg").read_text() == "old"


@pytest.fixture
def no_dot(monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_missing_dot_writes_dot_and_says_how_to_install(demo, tmp_path, no_dot):
    drawing = draw_rewrite(demo)
    out = tmp_path / "out"
    with pytest.raises(GraphvizMissing) as info:
        drawing.save(out / "diff.svg")
    message = str(info.value)
    assert isinstance(info.value, FxRewriteError)
    for hint in ("apt-get install graphviz", "brew install graphviz", "conda install -c conda-forge graphviz",
                 "dot -V", str(out / "diff.dot")):
        assert hint in message, hint
    assert info.value.dot_path == out / "diff.dot"
    assert sorted(p.name for p in out.iterdir()) == ["diff.dot"]  # no partial .svg, no temp file
    assert (out / "diff.dot").read_text() == drawing.source
    bundle = drawing._repr_mimebundle_()
    assert list(bundle) == ["text/plain"] and "apt-get install graphviz" in bundle["text/plain"]
    assert drawing._repr_svg_() is None


def test_missing_dot_in_write_rewrite_drawings(demo, tmp_path, no_dot):
    with pytest.raises(GraphvizMissing, match="the DOT sources were written instead"):
        write_rewrite_drawings(demo, tmp_path / "pics", formats=("svg", "png"))
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["after.dot", "before.dot", "diff.dot"]


def test_missing_dot_is_one_line_at_the_cli(demo, tmp_path, no_dot, monkeypatch, capsys):
    from fxrewrite import cli

    build = cli.build_parser

    def parser_with_draw(command=None):
        parser = build(command)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        draw = sub.add_parser("draw-test")
        draw.set_defaults(func=lambda args: draw_rewrite(demo).save(tmp_path / "x.svg"))
        return parser

    monkeypatch.setattr(cli, "build_parser", parser_with_draw)
    assert cli.main(["draw-test"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fxrewrite: error: cannot write") and "Traceback" not in err
    assert "apt-get install graphviz" in err and (tmp_path / "x.dot").exists()


@needs_dot
def test_write_rewrite_drawings(demo, tmp_path):
    written = write_rewrite_drawings(demo, tmp_path, formats=("svg", "dot"), title="demo")
    assert sorted(written) == ["after.dot", "after.svg", "before.dot", "before.svg", "diff.dot", "diff.svg"]
    before, after, diff = (set(_nodes(ET.parse(tmp_path / f"{n}.svg").getroot())) for n in ("before", "after", "diff"))
    assert AUX_NODES <= before and not AUX_NODES & after and AUX_NODES <= diff
    assert before == diff  # nothing new in this rewrite: the overlay is the original graph, marked
    with pytest.raises(TypeError):
        write_rewrite_drawings(demo, tmp_path, view="after")


@needs_dot
def test_jupyter_display_and_result_draw(demo):
    drawing = demo.draw(view="after")
    assert isinstance(drawing, Drawing)
    bundle = drawing._repr_mimebundle_()
    assert "<svg" in bundle["image/svg+xml"]
    assert drawing._repr_mimebundle_(exclude=["image/svg+xml"]) == {}
    assert "<svg" in drawing._repr_svg_()
    assert "after" in repr(drawing) and "kept" in repr(drawing)


@needs_dot
def test_draw_graph_with_status_and_param_table():
    gm = fxrewrite.trace(Net(), torch.zeros(2, 6))
    drawing = draw_graph(gm, status={"act": PRUNED}, param_table="module", title="plain")
    src = drawing.source
    assert f'fillcolor="{STATUS_STYLES[PRUNED].fill}"' in _dot_node_line(src, "act")
    assert "legend" in src and "parameters and buffers" in src
    svg = drawing.svg()
    assert ">head.b.*<" in svg or ">head.b.weight<" in svg


def test_unused_inputs_are_hidden_unless_asked():
    class Flags(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x, profile=None):
            return self.lin(x)

    gm = fxrewrite.trace(Flags())
    assert "profile" not in draw_graph(gm).statuses
    assert "profile" in draw_graph(gm, show_unused_inputs=True).statuses
    result = fxrewrite.rewrite(gm, [])
    assert "profile" not in draw_rewrite(result).statuses
    shown = draw_rewrite(result, view="side_by_side", show_unused_inputs=True).statuses
    assert "before/profile" in shown and "after/profile" in shown


def test_plain_symbolic_trace_without_provenance():
    gm = torch.fx.symbolic_trace(aux_branch_model())
    drawing = draw_graph(gm, clusters=1)
    assert drawing.clusters["aux_0_conv"] == ("aux",) and drawing.clusters["mean"] == ("main_head",)
    assert "Conv2d" in _dot_node_line(drawing.source, "stem_conv")
    with pytest.raises(ValueError, match="param_table must be"):
        draw_graph(gm, param_table="rows")


def test_one_frame_around_everything_is_dropped():
    from fxrewrite.examples import ConvBlock

    class Wrapped(nn.Module):  # like YOLOv9: every layer lives under "model"
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(ConvBlock(3, 4), ConvBlock(4, 4))

        def forward(self, x):
            return self.model(x)

    gm = fxrewrite.trace(Wrapped(), torch.zeros(1, 3, 8, 8))
    drawing = draw_graph(gm, clusters=2)
    assert drawing.clusters["model_0_conv"] == ("model", "model.0")  # placed in model.0 ...
    assert "cluster:model.0" in drawing.source and "cluster:model\"" not in drawing.source  # ... with no frame
    assert draw_graph(gm).clusters["model_1_bn"] == ("model.1",)  # automatic depth: 2
    layers = fxrewrite.trace(Wrapped(), torch.zeros(1, 3, 8, 8), max_depth=2)
    assert "subgraph cluster" not in draw_graph(layers).source  # one node per layer: no boxes


def test_caller_boxes_are_drawn_as_given(demo):
    drawing = draw_rewrite(demo, clusters={"main_1": ("main", "identity"), "aux_0_conv": "auxiliary"})
    assert drawing.clusters["main_1"] == ("main", "identity") and drawing.clusters["aux_0_conv"] == ("auxiliary",)
    assert 'id="cluster:main/identity"' in drawing.source and 'id="cluster:auxiliary"' in drawing.source


def test_large_graphs_get_layout_iteration_limits():
    from fxrewrite.draw import LARGE_GRAPH_LAYOUT, LARGE_GRAPH_NODES

    small = draw_graph(fxrewrite.trace(nn.Sequential(*[nn.ReLU() for _ in range(10)])))
    large = draw_graph(fxrewrite.trace(nn.Sequential(*[nn.ReLU() for _ in range(LARGE_GRAPH_NODES)])))
    assert "nslimit" not in small.source and "mclimit" not in small.source
    for key, value in LARGE_GRAPH_LAYOUT.items():
        assert f"{key}={value}" in large.source


# -- chains of operations drawn as one box (fold_chains) ---------------------------------------------------
def _drawn_node_ids(source: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r'^\s*"?([\w/]+)"? \[label=', source, re.M)}


def test_fold_chains_draws_each_chain_as_one_box(demo):
    drawing = draw_rewrite(demo, fold_chains=True)
    src = drawing.source
    assert drawing.chains["stem_conv"] == ["stem_conv", "stem_bn", "stem_act"]
    assert drawing.chains["mean"] == ["mean", "main_head_fc"]
    # one box per chain, named after its first node; the others are rows of that box
    drawn = _drawn_node_ids(src)
    assert "stem_conv" in drawn and not {"stem_bn", "stem_act", "main_head_fc"} & drawn
    box = _dot_node_line(src, "stem_conv")
    assert "fx-chain" in box
    assert box.index("<B>stem_conv</B>") < box.index("<B>stem_bn</B>") < box.index("<B>stem_act</B>")
    assert "BatchNorm2d" in box and "1×16×16×16" in box
    assert "3 operations, one after the other" in src
    # no edge inside a chain; edges into and out of it attach to the box
    assert "stem_conv -> stem_bn" not in src and "stem_bn -> stem_act" not in src
    assert "x -> stem_conv" in src and "stem_conv -> main_0_conv" in src and "stem_conv -> aux_0_conv" in src
    # every node keeps its status and its box, folded or not
    assert drawing.statuses == draw_rewrite(demo, fold_chains=False).statuses
    assert drawing.clusters["stem_act"] == ("stem",)
    assert "drawn as 6 boxes listing them in order" in src  # the drawing says it was folded


def test_chains_stop_at_branches_statuses_and_boxes(demo):
    chains = draw_rewrite(demo, fold_chains=True).chains
    members = {m: box for box, ms in chains.items() for m in ms}
    # stem_act feeds two nodes: the chain ends there; main_1 (collapsed) splits main in two chains
    assert members["stem_act"] == "stem_conv" and members["main_0_conv"] == "main_0_conv"
    assert "main_1" not in members and members["main_2_act"] == "main_2_conv"
    # pruned nodes chain among themselves (the edges between them are dropped with them), not with kept ones
    assert chains["aux_0_conv"] == ["aux_0_conv", "aux_0_bn", "aux_0_act", "aux_1_conv", "aux_1_bn", "aux_1_act"]
    assert chains["mean_1"] == ["mean_1", "aux_head_fc"]  # another box (aux_head): another chain
    # never across boxes: main_2_act -> mean crosses from main to main_head
    assert members["mean"] == "mean" and "x" not in members and "output" not in members
    assert "pruned" in _dot_node_line(draw_rewrite(demo, fold_chains=True).source, "aux_0_conv")
    # side by side: ids carry the view
    both = draw_rewrite(demo, view="side_by_side", fold_chains=True).chains
    assert both["after/stem_conv"] == ["after/stem_conv", "after/stem_bn", "after/stem_act"]
    assert "after/aux_0_conv" not in both and "before/aux_0_conv" in both


def test_large_graphs_fold_chains_by_default():
    from fxrewrite.draw import LARGE_GRAPH_NODES

    gm = fxrewrite.trace(nn.Sequential(*[nn.ReLU() for _ in range(LARGE_GRAPH_NODES)]))
    folded = draw_graph(gm)
    assert list(folded.chains) == ["_0"] and len(folded.chains["_0"]) == LARGE_GRAPH_NODES
    assert _drawn_node_ids(folded.source) == {"input_1", "_0", "output"}
    assert "fold_chains=False draws one box per node" in folded.source
    every = draw_graph(gm, fold_chains=False)
    assert every.chains == {} and len(_drawn_node_ids(every.source)) == LARGE_GRAPH_NODES + 2
    assert "fold_chains" not in every.source
    small = draw_graph(fxrewrite.trace(nn.Sequential(*[nn.ReLU() for _ in range(10)])))
    assert small.chains == {} and "fx-chain" not in small.source
    with pytest.raises(ValueError, match="fold_chains must be"):
        draw_graph(gm, fold_chains="yes")


@needs_dot
def test_svg_of_folded_chains(demo):
    root = _svg(draw_rewrite(demo, fold_chains=True))
    nodes = _nodes(root)
    assert "stem_bn" not in nodes
    text = _text(nodes["stem_conv"])
    assert "stem_conv" in text and "stem_bn" in text and "stem_act" in text and "BatchNorm2d" in text
    assert _fill(nodes["aux_0_conv"]) == STATUS_STYLES[PRUNED].fill


# -- renamed modules in the "after" picture; the order of the pictures side by side ---------------
def test_rename_labels_the_after_picture_with_new_and_old_names(demo):
    rename = {"main.2": "main.1"}  # what a rebind renumbering the main branch would do
    after = draw_rewrite(demo, view="after", rename=rename).source
    assert "<B>main.1.conv</B> <FONT COLOR=\"#5F5F5F\">" in after and "main.2.conv</FONT>" in after
    assert after.count("<B>main.1.") == 3  # main.2's conv, bn and act: each labelled with both names
    assert "<B>main_0_conv</B>" in after  # not renamed: its node name, as without rename
    for view in ("before", "overlay"):
        assert "<B>main.1.conv</B>" not in draw_rewrite(demo, view=view, rename=rename).source
    both = draw_rewrite(demo, view="side_by_side", rename=rename).source
    assert both.count("<B>main.1.conv</B>") == 1  # the after half only
    assert draw_rewrite(demo, view="after", rename=lambda path: path.replace("stem", "input_stem")).source.count(
        "<B>input_stem.") == 3


def test_rename_applies_to_the_boxes_of_the_after_picture(demo):
    clusters = {name: ("layer", "main.2") for name in ("main_2_conv", "main_2_bn", "main_2_act")}
    label = draw_rewrite(demo, view="after", clusters=clusters, rename={"main.2": "main.1"}).source
    assert "<B>main.1</B> <FONT COLOR=\"#5F5F5F\">\u2190 main.2</FONT>" in label.replace(
        '<FONT FACE="DejaVu Sans">\u2190</FONT>', "\u2190")


@needs_dot
def test_side_by_side_puts_before_left_of_after_with_caller_boxes(demo):
    """With boxes given by the caller (as the YOLOv9 drawings do), dot left alone put "after" first."""
    sections = {name: ("pruned" if status == PRUNED else "kept") for name, status in demo.node_status.items()}
    drawing = draw_rewrite(demo, view="side_by_side", clusters=sections)
    root = _svg(drawing)
    views = {g.get("class"): _bbox(_shape_element(g)) for g in root.iter(SVG + "g")
             if "fx-view" in (g.get("class") or "")}
    before, after = views["cluster fx-view view-before"], views["cluster fx-view view-after"]
    assert before[2] < after[0]
