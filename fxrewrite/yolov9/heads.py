"""Anchor-free YOLOv9 detection and segmentation heads.

Why this module is long: the nine official heads share their branch builders, anchors and
decoding; they are written once here as small subclasses of a few shared bases.

These classes reproduce the heads of the reference YOLOv9 code base
(WongKinYiu/yolov9) closely enough that

* class names, attribute names and ``state_dict`` keys/shapes are identical,
  so pickled checkpoints and state dicts of the reference models load into them;
* train-mode and eval-mode forwards return the same nested structure and
  bitwise-identical tensors for the same weights and inputs (including the
  lazily cached ``shape``/``anchors``/``strides`` and the ``export`` switch).

Every head predicts, per pyramid level and per grid cell, ``4 * reg_max``
distance-bin logits (a distribution over 0..reg_max-1 for each of the left,
top, right and bottom box edges) followed by ``nc`` class logits. In eval mode
the bins are collapsed to expected distances (:class:`DFL`), turned into
``xywh`` boxes around the cell centres (:func:`make_anchors`,
:func:`dist2bbox`) and scaled to pixels by the level stride.

Programmable-gradient-information (PGI) training models use the Dual/Triple
heads, which run an auxiliary branch next to the main one. The GELAN inference
model only keeps the main branch; each multi-branch class states below which
of its submodules form that branch and where its prediction sits in the eval
output, so that a graph rewriter can transplant it into the single-branch head.

Implementation notes
--------------------
* ``stride``, ``anchors`` and ``strides`` are plain tensor attributes, not
  buffers: they are not part of the ``state_dict`` (as in the reference).
* Unlike the reference, forwards never write into the caller's input list;
  the returned lists are fresh but hold the same tensors.
* Loops index the inputs by position (``x[i]``) instead of iterating over them,
  so the train-mode forward also works on a ``torch.fx`` proxy. The eval-mode
  anchor cache is shape-dependent control flow and is not symbolically traceable.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .blocks import Conv

__all__ = [
    "make_anchors",
    "dist2bbox",
    "DFL",
    "Proto",
    "Detect",
    "DDetect",
    "DualDetect",
    "DualDDetect",
    "TripleDetect",
    "TripleDDetect",
    "Segment",
    "DSegment",
    "DualDSegment",
]


# --------------------------------------------------------------------------- #
# Box geometry helpers
# --------------------------------------------------------------------------- #
def make_anchors(feats, strides, grid_cell_offset=0.5):
    """Cell-centre coordinates and per-cell strides for a list of feature maps.

    Args:
        feats: sequence of ``(B, C, H, W)`` tensors, one per pyramid level; only
            their spatial size, dtype and device are used.
        strides: per-level stride values (same length as ``feats``).
        grid_cell_offset: where inside a cell the anchor sits (0.5 = centre).

    Returns:
        ``(points, stride_per_point)`` of shapes ``(A, 2)`` (``x, y`` in grid
        units) and ``(A, 1)``, with ``A = sum(H * W)``; row-major per level.
    """
    assert feats is not None
    dtype, device = feats[0].dtype, feats[0].device
    points, cell_strides = [], []
    for level, level_stride in enumerate(strides):
        h, w = feats[level].shape[2], feats[level].shape[3]
        xs = torch.arange(end=w, device=device, dtype=dtype) + grid_cell_offset
        ys = torch.arange(end=h, device=device, dtype=dtype) + grid_cell_offset
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        # (x, y) pairs, x varying fastest -> same order as flattening H*W.
        points.append(torch.stack((grid_x, grid_y), -1).view(-1, 2))
        cell_strides.append(torch.full((h * w, 1), level_stride, dtype=dtype, device=device))
    return torch.cat(points), torch.cat(cell_strides)


def dist2bbox(distance, anchor_points, xywh=True, dim=-1):
    """Convert ``(left, top, right, bottom)`` distances from anchor points to boxes.

    ``dim`` is the axis holding the 4 distance values (and the 2 point
    coordinates of ``anchor_points``). Returns ``xywh`` boxes when ``xywh`` is
    true, otherwise ``xyxy`` corners.
    """
    near, far = torch.split(distance, 2, dim)
    top_left = anchor_points - near
    bottom_right = anchor_points + far
    if not xywh:
        return torch.cat((top_left, bottom_right), dim)
    centre = (top_left + bottom_right) / 2
    size = bottom_right - top_left
    return torch.cat((centre, size), dim)


# --------------------------------------------------------------------------- #
# Small building blocks
# --------------------------------------------------------------------------- #
class DFL(nn.Module):
    """Distribution focal loss integral: expected value of a binned distance.

    Input ``(B, 4 * c1, A)`` logits, output ``(B, 4, A)`` distances. The
    expectation ``sum_k k * softmax(logits)_k`` is realised as a frozen 1x1
    convolution whose weights are ``0, 1, ..., c1 - 1`` (key ``conv.weight``).
    """

    def __init__(self, c1=17):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1))
        self.c1 = c1

    def forward(self, x):
        batch, n_anchors = x.shape[0], x.shape[2]
        # (B, 4, bins, A) -> (B, bins, 4, A): the softmax and the 1x1 conv both
        # work over dim 1, so the bins must sit there.
        probs = x.view(batch, 4, self.c1, n_anchors).transpose(2, 1).softmax(1)
        return self.conv(probs).view(batch, 4, n_anchors)


class Proto(nn.Module):
    """Mask prototype generator: conv, 2x nearest upsample, conv, 1x1 conv.

    ``c1`` input channels, ``c_`` hidden channels (number of protos),
    ``c2`` output channels (number of masks).
    """

    def __init__(self, c1, c_=256, c2=32):
        super().__init__()
        self.cv1 = Conv(c1, c_, k=3)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.cv2 = Conv(c_, c_, k=3)
        self.cv3 = Conv(c_, c2)

    def forward(self, x):
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))


# --------------------------------------------------------------------------- #
# Tower builders (one tower = one nn.Sequential per pyramid level)
# --------------------------------------------------------------------------- #
def _round_up(value, multiple):
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return math.ceil(value / multiple) * multiple


def _box_width(c_in, reg_max, grouped):
    """Hidden width of a box tower fed by ``c_in`` channels.

    Grouped towers (the ``D*`` heads) use 4 groups, so their width is rounded
    up to a multiple of 4.
    """
    width = max((c_in // 4, reg_max * 4, 16))
    return _round_up(width, 4) if grouped else width


def _cls_width(c_in, nc):
    """Hidden width of a class tower fed by ``c_in`` channels."""
    return max((c_in, min((nc * 2, 128))))


def _box_towers(chs, width, reg_max, grouped):
    """Per-level box regressors: 3x3 Conv, 3x3 Conv, 1x1 conv to 4*reg_max bins.

    In the grouped variant the second Conv and the final 1x1 conv use 4 groups,
    one per box side.
    """
    groups = 4 if grouped else 1
    return nn.ModuleList(
        nn.Sequential(
            Conv(c, width, 3),
            Conv(width, width, 3, g=groups),
            nn.Conv2d(width, 4 * reg_max, 1, groups=groups),
        )
        for c in chs
    )


def _cls_towers(chs, width, nc):
    """Per-level classifiers: 3x3 Conv, 3x3 Conv, 1x1 conv to ``nc`` logits."""
    return nn.ModuleList(
        nn.Sequential(Conv(c, width, 3), Conv(width, width, 3), nn.Conv2d(width, nc, 1)) for c in chs
    )


def _mask_towers(chs, width, nm):
    """Per-level mask-coefficient predictors (same layout as a class tower)."""
    return _cls_towers(chs, width, nm)


# --------------------------------------------------------------------------- #
# Shared head machinery
# --------------------------------------------------------------------------- #
class _AnchorFreeHead(nn.Module):
    """Common state and helpers of all detection heads (not a reference class).

    Class-level defaults mirror the reference: ``dynamic`` forces the anchor
    grid to be rebuilt each eval call, ``export`` makes eval return only the
    decoded predictions, and ``shape``/``anchors``/``strides`` form the anchor
    cache, which is rebuilt when the first input's full shape changes.
    """

    dynamic = False
    export = False
    shape = None
    anchors = torch.empty(0)
    strides = torch.empty(0)

    def _init_common(self, nc, nl, inplace):
        self.nc = nc  # number of classes
        self.nl = nl  # number of pyramid levels per branch
        self.reg_max = 16  # distance bins per box side
        self.no = nc + self.reg_max * 4  # channels per level output
        self.inplace = inplace  # kept for checkpoint compatibility; unused here
        self.stride = torch.zeros(self.nl)  # filled in by the model builder

    def _level_outputs(self, box_towers, cls_towers, x, offset=0):
        """Raw per-level maps ``cat(box_logits, cls_logits)`` for one branch.

        The branch reads inputs ``x[offset : offset + nl]``.
        """
        return [
            torch.cat((box_towers[i](x[offset + i]), cls_towers[i](x[offset + i])), 1)
            for i in range(self.nl)
        ]

    def _refresh_anchor_cache(self, levels, shape):
        """Rebuild ``anchors`` (2, A) and ``strides`` (1, A) if the input shape changed."""
        if self.dynamic or self.shape != shape:
            points, cell_strides = make_anchors(levels, self.stride, 0.5)
            self.anchors, self.strides = points.transpose(0, 1), cell_strides.transpose(0, 1)
            self.shape = shape

    def _decode(self, levels, dfl, batch):
        """Decoded predictions ``(B, 4 + nc, A)``: pixel ``xywh`` boxes, class scores."""
        flat = torch.cat([lv.view(batch, self.no, -1) for lv in levels], 2)
        box_logits, cls_logits = flat.split((self.reg_max * 4, self.nc), 1)
        boxes = dist2bbox(dfl(box_logits), self.anchors.unsqueeze(0), xywh=True, dim=1) * self.strides
        return torch.cat((boxes, cls_logits.sigmoid()), 1)

    def _tower_pairs(self):
        """``(box_towers, cls_towers)`` per branch, in branch order."""
        raise NotImplementedError

    def bias_init(self):
        """Prior biases for the last layers; needs ``stride`` to be set.

        Box bins start at 1.0; class logits start at the log of the prior of
        about 5 objects per 640x640 image spread over ``nc`` classes and over
        the cells of a level with stride ``s``.
        """
        for box_towers, cls_towers in self._tower_pairs():
            for box, cls, s in zip(box_towers, cls_towers, self.stride):
                box[-1].bias.data[:] = 1.0
                cls[-1].bias.data[: self.nc] = math.log(5 / self.nc / (640 / s) ** 2)


class _SingleBranchHead(_AnchorFreeHead):
    """Forward of a one-branch head (``cv2``/``cv3``/``dfl``).

    The public classes define ``forward`` themselves (delegating here) so that
    ``Detect.forward`` / ``DDetect.forward`` - which the segmentation heads store
    as their ``detect`` attribute and which therefore end up in pickles - carry
    the public class in their qualified name, as in the reference.
    """

    def _tower_pairs(self):
        return [(self.cv2, self.cv3)]

    def _single_branch_forward(self, x):
        """Train: list of ``nl`` raw maps ``(B, no, H, W)``.

        Eval: ``(y, raw_maps)`` with ``y`` of shape ``(B, 4 + nc, A)``, or just
        ``y`` when ``export`` is set.
        """
        shape = x[0].shape
        levels = self._level_outputs(self.cv2, self.cv3, x)
        if self.training:
            return levels
        self._refresh_anchor_cache(levels, shape)
        y = self._decode(levels, self.dfl, shape[0])
        return y if self.export else (y, levels)


class _MultiBranchHead(_AnchorFreeHead):
    """Shared pieces of the Dual/Triple heads.

    Branch ``k`` reads inputs ``x[k * nl : (k + 1) * nl]``. The anchor cache is
    keyed on ``x[0]`` and built from branch 0's maps (all branches share the
    same spatial sizes).
    """

    def _dfls(self):
        """Integral modules per branch, in branch order."""
        raise NotImplementedError

    def _all_levels(self, x):
        return [
            self._level_outputs(box, cls, x, offset=k * self.nl)
            for k, (box, cls) in enumerate(self._tower_pairs())
        ]

    def _multi_branch_forward(self, x):
        """Train: one list of raw maps per branch, ``[maps1, maps2, ...]``.

        Eval: ``([y1, y2, ...], [maps1, maps2, ...])``, or just the list of
        decoded predictions when ``export`` is set.
        """
        shape = x[0].shape
        branches = self._all_levels(x)
        if self.training:
            return branches
        self._refresh_anchor_cache(branches[0], shape)
        y = [self._decode(levels, dfl, shape[0]) for levels, dfl in zip(branches, self._dfls())]
        return y if self.export else (y, branches)


class _DualBranchHead(_MultiBranchHead):
    """Two branches: aux (cv2/cv3/dfl) and main (cv4/cv5/dfl2)."""

    def _tower_pairs(self):
        return [(self.cv2, self.cv3), (self.cv4, self.cv5)]

    def _dfls(self):
        return [self.dfl, self.dfl2]



class _TripleBranchHead(_MultiBranchHead):
    """Three branches: cv2/cv3/dfl, cv4/cv5/dfl2, cv6/cv7/dfl3."""

    def _tower_pairs(self):
        return [(self.cv2, self.cv3), (self.cv4, self.cv5), (self.cv6, self.cv7)]

    def _dfls(self):
        return [self.dfl, self.dfl2, self.dfl3]


def _build_branches(head, ch, n_branches, grouped):
    """Create ``cv2..cv(2n+1)`` and ``dfl, dfl2, ...`` on ``head``.

    Registration order (and hence ``state_dict`` order) is all towers first,
    then the DFL modules. Each branch sizes its towers from its first input.
    """
    nl = head.nl
    for k in range(n_branches):
        chs = ch[k * nl : (k + 1) * nl]
        box_w = _box_width(chs[0], head.reg_max, grouped)
        cls_w = _cls_width(chs[0], head.nc)
        setattr(head, f"cv{2 * k + 2}", _box_towers(chs, box_w, head.reg_max, grouped))
        setattr(head, f"cv{2 * k + 3}", _cls_towers(chs, cls_w, head.nc))
    for k in range(n_branches):
        setattr(head, "dfl" if k == 0 else f"dfl{k + 1}", DFL(head.reg_max))


# --------------------------------------------------------------------------- #
# Detection heads
# --------------------------------------------------------------------------- #
class Detect(_SingleBranchHead):
    """Single-branch head with plain (ungrouped) box towers.

    Inputs ``ch`` = channels of P3.. levels. Submodules: ``cv2`` (box),
    ``cv3`` (class), ``dfl``. Used by YOLOv7-AF style configs.
    """

    def __init__(self, nc=80, ch=(), inplace=True):
        super().__init__()
        self._init_common(nc, len(ch), inplace)
        _build_branches(self, ch, 1, grouped=False)

    def forward(self, x):
        return self._single_branch_forward(x)


class DDetect(_SingleBranchHead):
    """Single-branch head with grouped box towers: the GELAN inference head.

    Same interface and outputs as :class:`Detect`; the box towers use 4 groups
    in their second Conv and final 1x1 conv and a width rounded up to 4.
    This is the target of the PGI -> GELAN conversion (see the Dual/Triple heads).
    """

    def __init__(self, nc=80, ch=(), inplace=True):
        super().__init__()
        self._init_common(nc, len(ch), inplace)
        _build_branches(self, ch, 1, grouped=True)

    def forward(self, x):
        return self._single_branch_forward(x)


class DualDetect(_DualBranchHead):
    """Two-branch :class:`Detect` (ungrouped towers) for PGI training.

    ``ch`` = (aux levels..., main levels...), ``nl = len(ch) // 2``.
    Main branch (the one kept for inference): inputs ``x[nl:2*nl]`` with
    ``cv4 -> cv2``, ``cv5 -> cv3``, ``dfl2 -> dfl`` of a single :class:`Detect`.
    Eval output ``out[0][1]`` (``out[1]`` with ``export``) is the main prediction.
    """

    def __init__(self, nc=80, ch=(), inplace=True):
        super().__init__()
        self._init_common(nc, len(ch) // 2, inplace)
        _build_branches(self, ch, 2, grouped=False)

    def forward(self, x):
        return self._multi_branch_forward(x)


class DualDDetect(_DualBranchHead):
    """Two-branch :class:`DDetect` (grouped box towers): the YOLOv9 PGI head.

    ``ch`` = (A3, A4, A5, P3, P4, P5): auxiliary levels first, main levels
    second; ``nl = len(ch) // 2``.
    Main branch: inputs ``x[nl:2*nl]``; the GELAN :class:`DDetect` takes
    ``cv4 -> cv2``, ``cv5 -> cv3``, ``dfl2 -> dfl`` (identical shapes, since
    the widths are derived from ``ch[nl]``). ``cv2``/``cv3``/``dfl`` form the
    auxiliary branch and are dropped.
    Eval output ``([y_aux, y_main], [aux_maps, main_maps])``: the main
    prediction is ``out[0][1]`` (``out[1]`` with ``export``); its raw maps are
    ``out[1][1]``.
    """

    def __init__(self, nc=80, ch=(), inplace=True):
        super().__init__()
        self._init_common(nc, len(ch) // 2, inplace)
        _build_branches(self, ch, 2, grouped=True)

    def forward(self, x):
        return self._multi_branch_forward(x)


class TripleDetect(_TripleBranchHead):
    """Three-branch :class:`Detect` (ungrouped towers).

    ``nl = len(ch) // 3``; branch ``k`` reads ``x[k*nl:(k+1)*nl]``.
    Train: ``[maps1, maps2, maps3]``. Eval: ``([y1, y2, y3], [maps1, maps2, maps3])``
    (or ``[y1, y2, y3]`` with ``export``). The reference validation uses the
    last branch (``out[0][2]``): ``cv6 -> cv2``, ``cv7 -> cv3``, ``dfl3 -> dfl``
    of a single :class:`Detect`.
    """

    def __init__(self, nc=80, ch=(), inplace=True):
        super().__init__()
        self._init_common(nc, len(ch) // 3, inplace)
        _build_branches(self, ch, 3, grouped=False)

    def forward(self, x):
        return self._multi_branch_forward(x)


class TripleDDetect(_TripleBranchHead):
    """Three-branch :class:`DDetect` (grouped box towers), as in yolov9-cf.

    ``ch`` = (A3..A5, P3..P5, P3..P5); ``nl = len(ch) // 3``.
    Train: ``[maps1, maps2, maps3]``. Eval returns only the last branch:
    ``(y3, maps3)`` (``y3`` alone with ``export``), so ``out[0]`` is the main
    prediction. Main branch: inputs ``x[2*nl:3*nl]``, ``cv6 -> cv2``,
    ``cv7 -> cv3``, ``dfl3 -> dfl`` of a single :class:`DDetect`.
    """

    def __init__(self, nc=80, ch=(), inplace=True):
        super().__init__()
        self._init_common(nc, len(ch) // 3, inplace)
        _build_branches(self, ch, 3, grouped=True)

    def forward(self, x):
        shape = x[0].shape
        branches = self._all_levels(x)
        if self.training:
            return branches
        # The anchor grid still comes from branch 0 (same spatial sizes); the
        # first two branches are not decoded since eval only reports branch 3.
        self._refresh_anchor_cache(branches[0], shape)
        y = self._decode(branches[2], self.dfl3, shape[0])
        return y if self.export else (y, branches[2])


# --------------------------------------------------------------------------- #
# Segmentation heads
# --------------------------------------------------------------------------- #
def _mask_coefficients(towers, x, nl, nm, batch, offset=0):
    """Per-anchor mask coefficients ``(B, nm, A)`` from ``x[offset:offset+nl]``."""
    return torch.cat([towers[i](x[offset + i]).view(batch, nm, -1) for i in range(nl)], 2)


def _segment_output(head, det, mc, p):
    """Assemble the single-branch segmentation output from detect results."""
    if head.training:
        return det, mc, p
    if head.export:
        return torch.cat([det, mc], 1), p
    y, levels = det
    return torch.cat([y, mc], 1), (levels, mc, p)


class Segment(Detect):
    """:class:`Detect` plus instance masks (YOLOv7-AF-seg style).

    Prototypes come from a :class:`Proto` on the first level ``x[0]``; mask
    coefficients from ``cv4`` on every level. Train: ``(maps, mc, protos)``.
    Eval: ``(cat([y, mc], 1), (maps, mc, protos))`` or, with ``export``,
    ``(cat([y, mc], 1), protos)``.
    """

    def __init__(self, nc=80, nm=32, npr=256, ch=(), inplace=True):
        super().__init__(nc, ch, inplace)
        self.nm = nm  # mask coefficients per anchor
        self.npr = npr  # hidden prototype channels
        self.proto = Proto(ch[0], self.npr, self.nm)
        self.detect = Detect.forward  # kept for checkpoint compatibility
        self.cv4 = _mask_towers(ch, max(ch[0] // 4, self.nm), self.nm)

    def forward(self, x):
        p = self.proto(x[0])
        mc = _mask_coefficients(self.cv4, x, self.nl, self.nm, p.shape[0])
        return _segment_output(self, Detect.forward(self, x), mc, p)


class DSegment(DDetect):
    """:class:`DDetect` plus instance masks: the GELAN segmentation head.

    ``ch`` = (P3, P4, P5, proto_source); ``nl = len(ch) - 1``. Prototypes are a
    1x1 :class:`Conv` (``proto``) on ``x[-1]``; mask coefficients from ``cv4``.
    Outputs as in :class:`Segment`.
    """

    def __init__(self, nc=80, nm=32, npr=256, ch=(), inplace=True):
        super().__init__(nc, ch[:-1], inplace)
        self.nl = len(ch) - 1
        self.nm = nm
        self.npr = npr  # unused by the 1x1 proto; kept for compatibility
        self.proto = Conv(ch[-1], self.nm, 1)
        self.detect = DDetect.forward  # kept for checkpoint compatibility
        self.cv4 = _mask_towers(ch[:-1], max(ch[0] // 4, self.nm), self.nm)

    def forward(self, x):
        p = self.proto(x[-1])
        mc = _mask_coefficients(self.cv4, x, self.nl, self.nm, p.shape[0])
        return _segment_output(self, DDetect.forward(self, x[:-1]), mc, p)


class DualDSegment(DualDDetect):
    """:class:`DualDDetect` plus instance masks for PGI training.

    ``ch`` = (A3..A5, P3..P5, aux_proto_source, main_proto_source);
    ``nl = (len(ch) - 2) // 2``. Aux masks: ``proto`` on ``x[-2]``, ``cv6`` on
    ``x[:nl]``; main masks: ``proto2`` on ``x[-1]``, ``cv7`` on ``x[nl:2*nl]``.
    Train: ``([aux_maps, main_maps], [mc_aux, mc_main], [p_aux, p_main])``.
    Eval: only the main branch,
    ``(cat([y_main, mc_main], 1), (main_maps, mc_main, p_main))`` - the same
    structure as a :class:`DSegment` eval output (``export`` is not supported:
    the reference raises with it, and so does this class). GELAN :class:`DSegment`
    mapping: ``cv4 -> cv2``, ``cv5 -> cv3``, ``dfl2 -> dfl``, ``cv7 -> cv4``,
    ``proto2 -> proto``; ``cv2``, ``cv3``, ``dfl``, ``cv6``, ``proto`` are aux.
    """

    def __init__(self, nc=80, nm=32, npr=256, ch=(), inplace=True):
        super().__init__(nc, ch[:-2], inplace)
        self.nl = (len(ch) - 2) // 2
        self.nm = nm
        self.npr = npr  # unused by the 1x1 protos; kept for compatibility
        self.proto = Conv(ch[-2], self.nm, 1)
        self.proto2 = Conv(ch[-1], self.nm, 1)
        self.detect = DualDDetect.forward  # kept for checkpoint compatibility
        self.cv6 = _mask_towers(ch[: self.nl], max(ch[0] // 4, self.nm), self.nm)
        self.cv7 = _mask_towers(ch[self.nl : 2 * self.nl], max(ch[self.nl] // 4, self.nm), self.nm)

    def forward(self, x):
        p = [self.proto(x[-2]), self.proto2(x[-1])]
        batch = p[0].shape[0]
        mc = [
            _mask_coefficients(self.cv6, x, self.nl, self.nm, batch),
            _mask_coefficients(self.cv7, x, self.nl, self.nm, batch, offset=self.nl),
        ]
        d = DualDDetect.forward(self, x[:-2])
        if self.training:
            return d, mc, p
        # d = ([y_aux, y_main], [aux_maps, main_maps]): index 1 picks the main
        # branch. Like the reference, ``export`` is not special-cased: then d is
        # [y_aux, y_main], d[0][1] is a 2-D slice and the cat raises.
        return torch.cat([d[0][1], mc[1]], 1), (d[1][1], mc[1], p[1])
