"""Tests for fxrewrite.yolov9.heads (YOLOv9 detection / segmentation heads).

Two groups:

* self-contained checks (shapes, state_dict keys, bias_init, DFL, anchor cache,
  geometry helpers, fx tracing, pickling);
* oracle checks against the real official classes (``tests/helpers/official.py``):
  identical weights must give identical state_dict layouts and bitwise-equal
  train/eval/export outputs, and a pickled official head re-bound to our classes
  must run unchanged.
"""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
import torch.fx
import torch.nn as nn

from fxrewrite.yolov9 import heads as H

from helpers.official import official, requires_official


STRIDES = (8.0, 16.0, 32.0)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run this module's tiny convolutions on one intra-op thread.

    With these sizes threading buys nothing, and on a busy 2-core box the
    OpenMP workers' spin-waiting made the module several times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def level_inputs(chs, batch=2, hw=(16, 24), seed=0):
    """Feature maps for the given channels; level k has size hw / 2**(k mod 3)."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    out = []
    for k, c in enumerate(chs):
        f = 2 ** (k % 3)
        out.append(torch.randn(batch, c, h // f, w // f, generator=g))
    return out


def seg_inputs(chs, n_proto, batch=2, hw=(16, 24), seed=0):
    """Level maps followed by ``n_proto`` proto-source maps at the P3 resolution."""
    det = level_inputs(chs[:-n_proto] if n_proto else chs, batch, hw, seed)
    g = torch.Generator().manual_seed(seed + 1)
    protos = [torch.randn(batch, c, hw[0], hw[1], generator=g) for c in chs[len(chs) - n_proto:]]
    return det + protos


def randomize_(module, seed=0):
    """Non-trivial parameters and BatchNorm statistics (DFL weights stay fixed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module


def assert_same(a, b, path="out"):
    """Same nesting (list vs tuple), same lengths, bitwise-equal tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.shape, b.shape)
        assert torch.equal(a, b), path
        return
    assert type(a) is type(b), (path, type(a), type(b))
    assert isinstance(a, (list, tuple)), (path, type(a))
    assert len(a) == len(b), (path, len(a), len(b))
    for i, (x, y) in enumerate(zip(a, b)):
        assert_same(x, y, f"{path}[{i}]")


def shapes(obj):
    if isinstance(obj, torch.Tensor):
        return tuple(obj.shape)
    return type(obj)([shapes(o) for o in obj])


def clone_list(xs):
    return [x.clone() for x in xs]


def with_strides(head, strides=STRIDES):
    head.stride = torch.tensor(strides[: head.nl])
    return head


# --------------------------------------------------------------------------- #
# geometry helpers
# --------------------------------------------------------------------------- #
def test_make_anchors_layout():
    feats = [torch.zeros(1, 3, 2, 3), torch.zeros(1, 3, 1, 2)]
    points, strides = H.make_anchors(feats, torch.tensor([8.0, 16.0]))
    assert points.shape == (8, 2) and strides.shape == (8, 1)
    expected = [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5], [0.5, 0.5], [1.5, 0.5]]
    assert torch.equal(points, torch.tensor(expected))
    assert torch.equal(strides.flatten(), torch.tensor([8.0] * 6 + [16.0] * 2))


def test_dist2bbox_xywh_and_xyxy():
    anchors = torch.tensor([[10.0, 20.0]])
    dist = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # left, top, right, bottom
    assert torch.equal(H.dist2bbox(dist, anchors, xywh=False), torch.tensor([[9.0, 18.0, 13.0, 24.0]]))
    assert torch.equal(H.dist2bbox(dist, anchors, xywh=True), torch.tensor([[11.0, 21.0, 4.0, 6.0]]))
    # channel-first layout, as used by the heads (dim=1)
    d = dist.t().unsqueeze(0)
    a = anchors.t().unsqueeze(0)
    assert torch.equal(H.dist2bbox(d, a, dim=1)[0, :, 0], torch.tensor([11.0, 21.0, 4.0, 6.0]))


def test_dfl_fixed_weight_and_expectation():
    dfl = H.DFL(16)
    assert list(dfl.state_dict()) == ["conv.weight"]
    assert dfl.conv.weight.shape == (1, 16, 1, 1)
    assert torch.equal(dfl.conv.weight.flatten(), torch.arange(16, dtype=torch.float))
    assert not dfl.conv.weight.requires_grad and dfl.c1 == 16
    # a one-hot-ish distribution on bin k must decode to ~k
    logits = torch.full((1, 4, 16, 5), -50.0)
    for side, k in enumerate((0, 3, 7, 15)):
        logits[0, side, k] = 50.0
    out = dfl(logits.view(1, 64, 5))
    assert out.shape == (1, 4, 5)
    assert torch.allclose(out[0, :, 0], torch.tensor([0.0, 3.0, 7.0, 15.0]))


def test_proto_shapes_and_keys():
    proto = H.Proto(8, 16, 4)
    assert [k for k in proto.state_dict() if k.endswith("conv.weight")] == [
        "cv1.conv.weight", "cv2.conv.weight", "cv3.conv.weight"]
    assert proto(torch.randn(2, 8, 5, 6)).shape == (2, 4, 10, 12)


# --------------------------------------------------------------------------- #
# detection heads without the oracle
# --------------------------------------------------------------------------- #
def test_ddetect_structure_and_keys():
    head = H.DDetect(nc=3, ch=(16, 32))
    assert (head.nc, head.nl, head.reg_max, head.no) == (3, 2, 16, 67)
    assert torch.equal(head.stride, torch.zeros(2))
    keys = list(head.state_dict())
    assert keys[:7] == [
        "cv2.0.0.conv.weight", "cv2.0.0.bn.weight", "cv2.0.0.bn.bias", "cv2.0.0.bn.running_mean",
        "cv2.0.0.bn.running_var", "cv2.0.0.bn.num_batches_tracked", "cv2.0.1.conv.weight"]
    assert keys[-1] == "dfl.conv.weight"
    tops = list(dict.fromkeys(k.split(".")[0] for k in keys))
    assert tops == ["cv2", "cv3", "dfl"]
    sd = head.state_dict()
    # box tower width max(16//4, 64, 16) = 64, grouped by 4; class width max(16, min(6, 128)) = 16
    assert sd["cv2.0.1.conv.weight"].shape == (64, 16, 3, 3)
    assert sd["cv2.0.2.weight"].shape == (64, 16, 1, 1)
    assert sd["cv3.1.0.conv.weight"].shape == (16, 32, 3, 3)
    assert sd["cv3.1.2.weight"].shape == (3, 16, 1, 1)
    # plain Detect is not grouped
    assert H.Detect(nc=3, ch=(16, 32)).state_dict()["cv2.0.2.weight"].shape == (64, 64, 1, 1)
    # no cached tensors in the state dict
    assert not any(k.startswith(("anchors", "strides", "stride")) for k in keys)


def test_grouped_width_rounds_up_to_multiple_of_4():
    head = H.DDetect(nc=2, ch=(264,))  # 264 // 4 = 66 -> 68
    assert head.cv2[0][0].conv.out_channels == 68
    assert H.Detect(nc=2, ch=(264,)).cv2[0][0].conv.out_channels == 66


@pytest.mark.parametrize(
    "cls, ch, branch_tops",
    [
        (H.DualDDetect, (16, 32, 64, 24, 40, 72), ["cv2", "cv3", "cv4", "cv5", "dfl", "dfl2"]),
        (H.TripleDDetect, (16, 32, 24, 40, 8, 8),
         ["cv2", "cv3", "cv4", "cv5", "cv6", "cv7", "dfl", "dfl2", "dfl3"]),
    ],
)
def test_multi_branch_key_order(cls, ch, branch_tops):
    head = cls(nc=4, ch=ch)
    tops = list(dict.fromkeys(k.split(".")[0] for k in head.state_dict()))
    assert tops == branch_tops


def test_detect_train_and_eval_shapes():
    head = with_strides(H.DDetect(nc=5, ch=(16, 32, 64)))
    x = level_inputs((16, 32, 64))
    out = head.train()(clone_list(x))
    assert shapes(out) == [(2, 69, 16, 24), (2, 69, 8, 12), (2, 69, 4, 6)]
    y, raw = head.eval()(clone_list(x))
    n_anchors = 16 * 24 + 8 * 12 + 4 * 6
    assert y.shape == (2, 4 + 5, n_anchors)
    assert shapes(raw) == [(2, 69, 16, 24), (2, 69, 8, 12), (2, 69, 4, 6)]
    assert ((y[:, 4:] >= 0) & (y[:, 4:] <= 1)).all()
    head.export = True
    assert head(clone_list(x)).shape == (2, 9, n_anchors)


def test_dual_and_triple_eval_structure():
    ch = (16, 32, 64, 24, 40, 72)
    dual = with_strides(H.DualDDetect(nc=3, ch=ch)).eval()
    y, raw = dual(level_inputs(ch))
    assert isinstance(y, list) and len(y) == 2 and all(t.shape == (2, 7, 504) for t in y)
    assert isinstance(raw, list) and len(raw) == 2 and len(raw[1]) == 3
    tri = with_strides(H.TripleDDetect(nc=3, ch=ch + (8, 8, 8))).eval()
    y3, raw3 = tri(level_inputs(ch + (8, 8, 8)))
    assert isinstance(y3, torch.Tensor) and y3.shape == (2, 7, 504) and len(raw3) == 3
    assert shapes(tri.train()(level_inputs(ch + (8, 8, 8)))) == [[(2, 67, 16, 24), (2, 67, 8, 12), (2, 67, 4, 6)]] * 3


def test_bias_init_values():
    head = with_strides(H.DualDDetect(nc=7, ch=(16, 32, 64, 16, 32, 64)))
    head.bias_init()
    for box, cls in ((head.cv2, head.cv3), (head.cv4, head.cv5)):
        for i, s in enumerate(STRIDES):
            assert torch.equal(box[i][-1].bias, torch.ones(64))
            expected = math.log(5 / 7 / (640 / s) ** 2)
            assert torch.allclose(cls[i][-1].bias, torch.full((7,), expected))


def test_anchor_cache_behaviour():
    head = with_strides(H.DDetect(nc=2, ch=(8, 16, 32))).eval()
    assert head.shape is None and head.anchors.numel() == 0  # class defaults
    x = level_inputs((8, 16, 32), hw=(8, 8))
    head(clone_list(x))
    assert head.shape == x[0].shape
    assert head.anchors.shape == (2, 64 + 16 + 4) and head.strides.shape == (1, 84)
    assert torch.equal(head.anchors[:, 0], torch.tensor([0.5, 0.5]))
    assert torch.equal(head.strides[0, [0, 64, 80]], torch.tensor([8.0, 16.0, 32.0]))
    cached = head.anchors
    head(clone_list(x))
    assert head.anchors is cached  # same shape: reused
    head(level_inputs((8, 16, 32), hw=(16, 8)))
    assert head.anchors is not cached and head.anchors.shape == (2, 128 + 32 + 8)
    cached = head.anchors
    head.dynamic = True
    head(level_inputs((8, 16, 32), hw=(16, 8)))
    assert head.anchors is not cached  # dynamic: rebuilt every call
    # the cache is per instance; the class default is untouched
    assert H.DDetect.shape is None and H.DDetect.anchors.numel() == 0
    # training never touches the cache
    fresh = with_strides(H.DDetect(nc=2, ch=(8, 16, 32))).train()
    fresh(clone_list(x))
    assert fresh.shape is None


def test_forward_does_not_mutate_inputs():
    x = level_inputs((8, 16, 32))
    ids = [id(t) for t in x]
    with_strides(H.DDetect(nc=2, ch=(8, 16, 32))).eval()(x)
    assert [id(t) for t in x] == ids


# --------------------------------------------------------------------------- #
# segmentation heads without the oracle
# --------------------------------------------------------------------------- #
def test_segment_heads_structure_and_shapes():
    seg = with_strides(H.DSegment(nc=3, nm=8, npr=16, ch=(16, 32, 64, 24)))
    assert (seg.nl, seg.nm, seg.npr) == (3, 8, 16)
    assert list(dict.fromkeys(k.split(".")[0] for k in seg.state_dict())) == ["cv2", "cv3", "dfl", "proto", "cv4"]
    x = seg_inputs((16, 32, 64, 24), 1)
    maps, mc, p = seg.train()(clone_list(x))
    assert shapes(maps) == [(2, 67, 16, 24), (2, 67, 8, 12), (2, 67, 4, 6)]
    assert mc.shape == (2, 8, 504) and p.shape == (2, 8, 16, 24)
    pred, (maps, mc, p) = seg.eval()(clone_list(x))
    assert pred.shape == (2, 4 + 3 + 8, 504)

    dual = with_strides(H.DualDSegment(nc=3, nm=8, npr=16, ch=(16, 32, 64, 24, 40, 72, 24, 32)))
    assert list(dict.fromkeys(k.split(".")[0] for k in dual.state_dict())) == [
        "cv2", "cv3", "cv4", "cv5", "dfl", "dfl2", "proto", "proto2", "cv6", "cv7"]
    x = seg_inputs((16, 32, 64, 24, 40, 72, 24, 32), 2)
    d, mc, p = dual.train()(clone_list(x))
    assert len(d) == 2 and len(mc) == 2 and len(p) == 2
    pred, (maps, mc1, p1) = dual.eval()(clone_list(x))
    assert pred.shape == (2, 15, 504) and len(maps) == 3 and p1.shape == (2, 8, 16, 24)

    classic = with_strides(H.Segment(nc=3, nm=8, npr=16, ch=(16, 32, 64)))
    maps, mc, p = classic.train()(level_inputs((16, 32, 64)))
    assert p.shape == (2, 8, 32, 48) and mc.shape == (2, 8, 504)


# --------------------------------------------------------------------------- #
# torch.fx and pickling
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "make, inputs",
    [
        (lambda: H.DDetect(3, (8, 16, 32)), lambda: level_inputs((8, 16, 32))),
        (lambda: H.DualDDetect(3, (8, 16, 32, 8, 16, 32)), lambda: level_inputs((8, 16, 32) * 2)),
        (lambda: H.DualDSegment(3, 8, 16, (8, 16, 32, 8, 16, 32, 8, 8)),
         lambda: seg_inputs((8, 16, 32, 8, 16, 32, 8, 8), 2)),
    ],
)
def test_train_forward_is_fx_traceable(make, inputs):
    head = with_strides(randomize_(make())).train()
    gm = torch.fx.symbolic_trace(head)
    x = inputs()
    head_copy = pickle.loads(pickle.dumps(head))  # same BN state for both runs
    assert_same(gm(clone_list(x)), head_copy(clone_list(x)))


def test_pickle_roundtrip_keeps_detect_alias():
    seg = with_strides(H.DSegment(nc=3, nm=8, npr=16, ch=(16, 32, 64, 24))).eval()
    buf = io.BytesIO()
    torch.save(seg, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert again.detect is H.DDetect.forward
    # the stored function is named after the public class (pickles reference it)
    assert again.detect.__qualname__ == "DDetect.forward"
    assert H.Segment(3, 8, 16, ch=(16,)).detect.__qualname__ == "Detect.forward"
    assert H.DualDSegment(3, 8, 16, ch=(16, 16, 8, 8)).detect.__qualname__ == "DualDDetect.forward"
    x = seg_inputs((16, 32, 64, 24), 1)
    assert_same(again(clone_list(x)), seg(clone_list(x)))


# --------------------------------------------------------------------------- #
# oracle: the real official classes
# --------------------------------------------------------------------------- #
DET_CASES = [
    # (class name, kwargs, channels, number of proto-source inputs)
    ("Detect", dict(nc=3), (16, 32, 64), 0),
    ("Detect", dict(nc=80), (64, 96, 128), 0),
    ("DDetect", dict(nc=3), (16, 32, 64), 0),
    ("DDetect", dict(nc=80), (264, 48, 96), 0),  # grouped width rounded up (66 -> 68)
    ("DualDetect", dict(nc=5), (16, 32, 64, 24, 40, 72), 0),
    ("DualDDetect", dict(nc=5), (16, 32, 64, 24, 40, 72), 0),
    ("DualDDetect", dict(nc=80), (96, 48, 32, 272, 40, 72), 0),
    ("TripleDetect", dict(nc=4), (16, 32, 64, 24, 40, 72, 24, 40, 72), 0),
    ("TripleDDetect", dict(nc=4), (16, 32, 64, 24, 40, 72, 24, 40, 72), 0),
    ("TripleDDetect", dict(nc=90), (20, 32, 264, 24, 40, 72), 0),  # nl = 2, third branch rounded 66 -> 68
    ("Segment", dict(nc=3, nm=8, npr=16), (16, 32, 64), 0),
    ("Segment", dict(nc=20, nm=32, npr=24), (96, 32, 64), 0),
    ("DSegment", dict(nc=3, nm=8, npr=16), (16, 32, 64, 24), 1),
    ("DSegment", dict(nc=20, nm=32, npr=256), (144, 32, 64, 48), 1),
    ("DualDSegment", dict(nc=3, nm=8, npr=16), (16, 32, 64, 24, 40, 72, 24, 32), 2),
    ("DualDSegment", dict(nc=20, nm=32, npr=256), (144, 32, 64, 48, 40, 200, 24, 32), 2),
]


def _case_id(case):
    name, kw, ch, _ = case
    return f"{name}-nc{kw['nc']}-{'x'.join(map(str, ch))}"


def _inputs_for(ch, n_proto, nl, hw, seed):
    """Inputs with per-branch pyramid sizes (each branch's levels halve in size)."""
    g = torch.Generator().manual_seed(seed)
    n_det = len(ch) - n_proto
    out = []
    for k, c in enumerate(ch[:n_det]):
        f = 2 ** (k % nl)
        out.append(torch.randn(2, c, hw[0] // f, hw[1] // f, generator=g))
    out += [torch.randn(2, c, hw[0], hw[1], generator=g) for c in ch[n_det:]]
    return out


def _official_heads():
    """``models.yolo`` with the ``models.common`` names its head classes use.

    The official ``yolo.py`` only pulls ``Conv``, ``DFL``, ``Proto`` ... into its
    namespace inside ``parse_model`` (its module-level import runs while
    ``models.common`` is half-initialised); heads built directly need them too.
    """
    off = official()
    for key, value in vars(off.common).items():
        if not key.startswith("_"):
            vars(off.yolo).setdefault(key, value)
    return off.yolo


def _pair(name, kwargs, ch, seed=0):
    off = _official_heads()
    theirs = randomize_(getattr(off, name)(ch=ch, **kwargs), seed)
    ours = getattr(H, name)(ch=ch, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for m in (theirs, ours):
        with_strides(m)
    return theirs, ours


@requires_official
@pytest.mark.parametrize("case", DET_CASES, ids=_case_id)
def test_oracle_layout_and_attributes(case):
    name, kwargs, ch, _ = case
    theirs, ours = _pair(name, kwargs, ch)
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert list(sd_t) == list(sd_o)
    assert all(sd_t[k].shape == sd_o[k].shape for k in sd_t)
    # remove_duplicate=False: the reference shares one SiLU instance between all
    # Convs, blocks.Conv gives each Conv its own; the module trees are the same.
    tree_t = [(n, type(m).__name__) for n, m in theirs.named_modules(remove_duplicate=False)]
    tree_o = [(n, type(m).__name__) for n, m in ours.named_modules(remove_duplicate=False)]
    assert tree_t == tree_o
    for attr in ("nc", "nl", "reg_max", "no", "inplace", "nm", "npr", "dynamic", "export", "shape"):
        assert getattr(theirs, attr, None) == getattr(ours, attr, None), attr
    assert torch.equal(theirs.stride, ours.stride)
    # every instance attribute of the official head exists on ours (checkpoint compatibility)
    assert set(vars(theirs)) - set(vars(ours)) == set()


@requires_official
@pytest.mark.parametrize("case", DET_CASES, ids=_case_id)
def test_oracle_forward_bitwise(case):
    name, kwargs, ch, n_proto = case
    theirs, ours = _pair(name, kwargs, ch, seed=1)
    nl = ours.nl
    x = _inputs_for(ch, n_proto, nl, (8, 12), seed=2)

    # train mode: outputs and the BatchNorm statistics it updates
    assert_same(ours.train()(clone_list(x)), theirs.train()(clone_list(x)), "train")
    for (k, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), k

    # eval mode, twice with the same shape (cache reuse), then a new shape
    theirs.eval(), ours.eval()
    for shape_seed, hw in ((3, (8, 12)), (3, (8, 12)), (4, (4, 16))):
        xe = _inputs_for(ch, n_proto, nl, hw, seed=shape_seed)
        assert_same(ours(clone_list(xe)), theirs(clone_list(xe)), f"eval{hw}")
        assert ours.shape == theirs.shape
        assert torch.equal(ours.anchors, theirs.anchors) and torch.equal(ours.strides, theirs.strides)

    # export mode
    theirs.export = ours.export = True
    if name == "DualDSegment":
        # The reference ignores ``export`` here and indexes the export-mode list as
        # if it were the normal tuple, which fails; ours fails the same way.
        for head in (theirs, ours):
            with pytest.raises(RuntimeError):
                head(clone_list(x))
    else:
        assert_same(ours(clone_list(x)), theirs(clone_list(x)), "export")

    # dynamic grid
    theirs.export = ours.export = False
    theirs.dynamic = ours.dynamic = True
    assert_same(ours(clone_list(x)), theirs(clone_list(x)), "dynamic")


@requires_official
@pytest.mark.parametrize("case", DET_CASES, ids=_case_id)
def test_oracle_bias_init(case):
    name, kwargs, ch, _ = case
    theirs, ours = _pair(name, kwargs, ch, seed=5)
    theirs.bias_init()
    ours.bias_init()
    for (k, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), k


@requires_official
def test_oracle_dfl_and_proto():
    off = official()
    assert torch.equal(off.common.DFL(16).conv.weight, H.DFL(16).conv.weight)
    theirs = randomize_(off.common.Proto(8, 16, 4))
    ours = H.Proto(8, 16, 4)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(theirs.state_dict()) == list(ours.state_dict())
    x = torch.randn(2, 8, 5, 7)
    assert_same(ours.eval()(x), theirs.eval()(x))
    assert_same(ours.train()(x), theirs.train()(x))
    # geometry helpers agree bitwise too
    from utils.tal.anchor_generator import dist2bbox, make_anchors  # official, registered by official()

    feats = [torch.zeros(1, 1, 5, 7), torch.zeros(1, 1, 3, 4)]
    stride = torch.tensor([8.0, 16.0])
    assert_same(H.make_anchors(feats, stride), make_anchors(feats, stride))
    d, a = torch.randn(2, 4, 9), torch.randn(1, 2, 9)
    for xywh in (True, False):
        assert_same(H.dist2bbox(d, a, xywh, 1), dist2bbox(d, a, xywh, 1))


class _RebindUnpickler(pickle.Unpickler):
    """Resolve the official head classes to ours (what a checkpoint loader does)."""

    def find_class(self, module, name):
        if module in ("models.yolo", "models.common") and hasattr(H, name):
            return getattr(H, name)
        return super().find_class(module, name)


@requires_official
@pytest.mark.parametrize(
    "name, kwargs, ch, n_proto",
    [
        ("DualDDetect", dict(nc=5), (16, 32, 64, 24, 40, 72), 0),
        ("TripleDDetect", dict(nc=4), (16, 32, 64, 24, 40, 72, 24, 40, 72), 0),
        ("DSegment", dict(nc=3, nm=8, npr=16), (16, 32, 64, 24), 1),
        ("DualDSegment", dict(nc=3, nm=8, npr=16), (16, 32, 64, 24, 40, 72, 24, 32), 2),
    ],
)
def test_oracle_pickled_official_head_runs_as_ours(name, kwargs, ch, n_proto):
    theirs, _ = _pair(name, kwargs, ch, seed=7)
    theirs.eval()
    x = _inputs_for(ch, n_proto, theirs.nl, (16, 24), seed=8)
    expected = theirs(clone_list(x))  # also fills the anchor cache that gets pickled
    rebound = _RebindUnpickler(io.BytesIO(pickle.dumps(theirs, protocol=2))).load()
    assert type(rebound) is getattr(H, name)
    assert isinstance(rebound.dfl, H.DFL)
    assert_same(rebound(clone_list(x)), expected)
    if hasattr(rebound, "detect"):
        assert rebound.detect.__qualname__.endswith("forward")


# --------------------------------------------------------------------------- #
# main-branch facts used by the PGI -> GELAN rewrite
# --------------------------------------------------------------------------- #
# multi-branch head -> (single head, submodule prefix map, branch index of the
# main inputs, picker of the main prediction in the eval output, picker of its raw maps)
MAIN_BRANCH = {
    "DualDetect": ("Detect", {"cv4": "cv2", "cv5": "cv3", "dfl2": "dfl"}, 1,
                   lambda o: o[0][1], lambda o: o[1][1]),
    "DualDDetect": ("DDetect", {"cv4": "cv2", "cv5": "cv3", "dfl2": "dfl"}, 1,
                    lambda o: o[0][1], lambda o: o[1][1]),
    "TripleDetect": ("Detect", {"cv6": "cv2", "cv7": "cv3", "dfl3": "dfl"}, 2,
                     lambda o: o[0][2], lambda o: o[1][2]),
    "TripleDDetect": ("DDetect", {"cv6": "cv2", "cv7": "cv3", "dfl3": "dfl"}, 2,
                      lambda o: o[0], lambda o: o[1]),
    "DualDSegment": ("DSegment", {"cv4": "cv2", "cv5": "cv3", "dfl2": "dfl", "cv7": "cv4", "proto2": "proto"}, 1,
                     lambda o: o, None),  # the whole eval output already is the main branch
}


def _impl(which):
    return H if which == "ours" else _official_heads()


def _single_from_multi(multi, single_cls, prefix_map, ch_single, kwargs):
    single = single_cls(ch=ch_single, **kwargs)
    state = {}
    for key, value in multi.state_dict().items():
        top, _, rest = key.partition(".")
        if top in prefix_map:
            state[f"{prefix_map[top]}.{rest}"] = value
    single.load_state_dict(state, strict=True)  # strict: the map covers the single head exactly
    return with_strides(single)


@pytest.mark.parametrize("which", ["ours", pytest.param("official", marks=requires_official)])
@pytest.mark.parametrize(
    "name, kwargs, ch, n_proto",
    [
        ("DualDetect", dict(nc=5), (16, 32, 64, 24, 40, 72), 0),
        ("DualDDetect", dict(nc=5), (16, 32, 64, 264, 40, 72), 0),
        ("TripleDetect", dict(nc=4), (16, 32, 64, 24, 40, 72, 8, 16, 48), 0),
        ("TripleDDetect", dict(nc=4), (16, 32, 64, 24, 40, 72, 48, 16, 8), 0),
        ("DualDSegment", dict(nc=3, nm=8, npr=16), (16, 32, 64, 80, 40, 72, 24, 32), 2),
    ],
)
def test_main_branch_equals_single_head(which, name, kwargs, ch, n_proto):
    impl = _impl(which)
    single_name, prefix_map, branch, pick, pick_raw = MAIN_BRANCH[name]
    multi = with_strides(randomize_(getattr(impl, name)(ch=ch, **kwargs), seed=11))
    nl = multi.nl
    main_ch = ch[branch * nl:(branch + 1) * nl] + ch[len(ch) - 1:] * (n_proto > 0)
    single = _single_from_multi(multi, getattr(impl, single_name), prefix_map, main_ch, kwargs)

    x = _inputs_for(ch, n_proto, nl, (8, 12), seed=12)
    x_main = x[branch * nl:(branch + 1) * nl] + x[len(x) - 1:] * (n_proto > 0)

    out_multi = multi.eval()(clone_list(x))
    out_single = single.eval()(clone_list(x_main))
    if pick_raw is None:
        assert_same(pick(out_multi), out_single)
    else:
        assert_same(pick(out_multi), out_single[0])
        assert_same(pick_raw(out_multi), out_single[1])

    # training outputs: the main branch's maps (and masks) are the single head's
    train_multi = multi.train()(clone_list(x))
    train_single = single.train()(clone_list(x_main))
    if name == "DualDSegment":
        d, mc, p = train_multi
        assert_same((d[1], mc[1], p[1]), train_single)
    else:
        assert_same(train_multi[branch], train_single)


@requires_official
@pytest.mark.parametrize("cfg", ["yolov9-t.yaml", "gelan-t.yaml"])
def test_oracle_head_inside_official_model(cfg):
    """Our head class in place of the official one inside a whole official model.

    The head instance keeps its state (weights, stride set by the model builder,
    the reference's own submodules); only its class is re-bound, as unpickling
    a checkpoint with our classes would do.
    """
    import copy

    off = official()
    model = off.build(cfg, nc=7).eval()
    ours = copy.deepcopy(model)
    head = ours.model[-1]
    head.__class__ = getattr(H, type(head).__name__)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_same(ours(x), model(x))
        assert_same(ours.train()(x), model.train()(x))
