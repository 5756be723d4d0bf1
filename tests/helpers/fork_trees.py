"""Fork-like YOLOv9 source trees for the ``--code`` tests, written into a folder by :func:`write_tree`.

Each tree is what a fork of the official repository looks like: ``models/common.py`` (blocks),
``models/yolo.py`` (heads, ``parse_model``, ``DetectionModel``), ``utils/general.py``, each file
importing the others by their bare package names. The code is written for these tests (a
small anchor-free head family with the official layout: ``DDetect`` with ``cv2``/``cv3``/``dfl``,
``DualDDetect`` adding the main branch's ``cv4``/``cv5``/``dfl2``), and each case adds its own
blocks, head edits and builder rules. The trees are built, trained-and-saved and loaded back
only by running their own code (:data:`BUILD_SCRIPT`, :data:`CHECK_SCRIPT`, in a subprocess).
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

GENERAL = '''
import math


def make_divisible(x, divisor=8):
    return int(math.ceil(x / divisor) * divisor)


def autopad(k, p=None, d=1):
    if p is None:
        k = d * (k - 1) + 1
        p = k // 2
    return p
'''

COMMON = '''
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.general import autopad


class Conv(nn.Module):
    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1, c2):
        super().__init__()
        self.cv1 = Conv(c1, c2, 3)
        self.cv2 = Conv(c2, c2, 3)
        self.add = c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class CSP(nn.Module):
    """Split, n bottlenecks on one half, concatenate every stage."""

    def __init__(self, c1, c2, n=1):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c) for _ in range(n))
        self.cv2 = Conv((2 + n) * self.c, c2)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Down(nn.Module):
    def __init__(self, c1, c2):
        super().__init__()
        self.cv1 = Conv(c1 // 2, c2 // 2, 3, 2)
        self.cv2 = Conv(c1 // 2, c2 // 2, 1)

    def forward(self, x):
        a, b = x.chunk(2, 1)
        return torch.cat((self.cv1(a), self.cv2(F.max_pool2d(b, 3, 2, 1))), 1)


class Silence(nn.Module):
    def forward(self, x):
        return x


class Concat(nn.Module):
    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class CBLinear(nn.Module):
    def __init__(self, c1, c2s, k=1):
        super().__init__()
        self.c2s = c2s
        self.conv = nn.Conv2d(c1, sum(c2s), k, 1, autopad(k), bias=True)

    def forward(self, x):
        return self.conv(x).split(self.c2s, dim=1)


class CBFuse(nn.Module):
    def __init__(self, idx):
        super().__init__()
        self.idx = idx

    def forward(self, xs):
        size = xs[-1].shape[2:]
        out = [F.interpolate(x[self.idx[i]], size=size, mode="nearest") for i, x in enumerate(xs[:-1])]
        return torch.sum(torch.stack(out + xs[-1:]), dim=0)


class DFL(nn.Module):
    def __init__(self, c1=16):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)
'''

YOLO = '''
import copy
import math
from pathlib import Path

import torch
import torch.nn as nn

from models.common import *
from utils.general import make_divisible


def decode(feats, stride, dfl, nc, reg_max):
    """Boxes (pixel xywh) and class scores of one branch's feature maps."""
    b = feats[0].shape[0]
    points, strides = [], []
    for f, s in zip(feats, stride.tolist()):
        h, w = f.shape[2:]
        sy, sx = torch.meshgrid(torch.arange(h, dtype=f.dtype) + 0.5, torch.arange(w, dtype=f.dtype) + 0.5,
                                indexing="ij")
        points.append(torch.stack((sx, sy), -1).view(-1, 2))
        strides.append(torch.full((h * w, 1), s, dtype=f.dtype))
    points, strides = torch.cat(points).transpose(0, 1), torch.cat(strides).transpose(0, 1)
    flat = torch.cat([f.view(b, f.shape[1], -1) for f in feats], 2)
    box, cls = flat.split((4 * reg_max, flat.shape[1] - 4 * reg_max), 1)
    lt, rb = dfl(box).chunk(2, 1)
    x1y1, x2y2 = points - lt, points + rb
    xywh = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * strides
    return torch.cat((xywh, cls.sigmoid()), 1)


def towers(ch, c2, c3, reg_max, no_cls):
    box = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for x in ch)
    cls = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, no_cls, 1)) for x in ch)
    return box, cls


class DDetect(nn.Module):
    def __init__(self, nc=80, ch=(), inplace=True):
        super().__init__()
        self.nc, self.nl, self.reg_max, self.inplace = nc, len(ch), 16, inplace
        self.stride = torch.zeros(self.nl)
        c2, c3 = max(16, ch[0] // 4, 4 * self.reg_max), max(ch[0], min(nc, 32))
        self.cv2, self.cv3 = towers(ch, c2, c3, self.reg_max, CLS_OUT(nc))
        self.dfl = DFL(self.reg_max)

    def forward(self, x):
        for i in range(self.nl):
            x[i] = torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1)
        if self.training:
            return x
        return decode(x, self.stride, self.dfl, self.nc, self.reg_max), x


class DualDDetect(nn.Module):
    def __init__(self, nc=80, ch=(), inplace=True):
        super().__init__()
        self.nc, self.nl, self.reg_max, self.inplace = nc, len(ch) // 2, 16, inplace
        self.stride = torch.zeros(self.nl)
        c2, c3 = max(16, ch[0] // 4, 4 * self.reg_max), max(ch[0], min(nc, 32))
        c4, c5 = max(16, ch[self.nl] // 4, 4 * self.reg_max), max(ch[self.nl], min(nc, 32))
        self.cv2, self.cv3 = towers(ch[:self.nl], c2, c3, self.reg_max, CLS_OUT(nc))
        self.cv4, self.cv5 = towers(ch[self.nl:], c4, c5, self.reg_max, CLS_OUT(nc))
        self.dfl, self.dfl2 = DFL(self.reg_max), DFL(self.reg_max)

    def forward(self, x):
        d1, d2 = [], []
        for i in range(self.nl):
            d1.append(torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1))
            d2.append(torch.cat((self.cv4[i](x[self.nl + i]), self.cv5[i](x[self.nl + i])), 1))
        if self.training:
            return [d1, d2]
        y1 = decode(d1, self.stride, self.dfl, self.nc, self.reg_max)
        y2 = decode(d2, self.stride, self.dfl2, self.nc, self.reg_max)
        return [y1, y2], [d1, d2]


def CLS_OUT(nc):
    return nc


HEADS = (DDetect, DualDDetect)
CHANNEL_BLOCKS = (Conv, CSP, Down)
REPEAT_BLOCKS = (CSP,)


def parse_model(d, ch):
    nc, gw = d["nc"], d.get("width_multiple", 1.0)
    layers, save, c2 = [], [], ch[-1]
    for i, (f, n, m, args) in enumerate(d["backbone"] + d["head"]):
        m = eval(m) if isinstance(m, str) else m
        args = [nc if a == "nc" else a for a in args]
        if m in CHANNEL_BLOCKS:
            c1, c2 = ch[f], make_divisible(args[0] * gw, 8)
            args = [c1, c2, *args[1:]]
            if m in REPEAT_BLOCKS:
                args.insert(2, n)
                n = 1
        elif m is Concat:
            c2 = sum(ch[x] for x in f)
        elif m in HEADS:
            args.append([ch[x] for x in f])
        elif m is CBLinear:
            c2 = args[0]
            args = [ch[f], c2, *args[1:]]
        elif m is CBFuse:
            c2 = ch[f[-1]]
        else:
            c2 = BUILD_OTHER(m, f, args, ch, gw)
        m_ = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
        m_.np = sum(x.numel() for x in m_.parameters())
        m_.i, m_.f, m_.type = i, f, str(m)[8:-2]
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(m_)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save)


def BUILD_OTHER(m, f, args, ch, gw):
    """Channels of any other layer: those of its (first) input."""
    return ch[f if isinstance(f, int) else f[0]]


def initialize_weights(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps, m.momentum = 1e-3, 0.03
        elif isinstance(m, nn.SiLU):
            m.inplace = True


class DetectionModel(nn.Module):
    def __init__(self, cfg="model.yaml", ch=3, nc=None):
        super().__init__()
        if isinstance(cfg, dict):
            self.yaml = cfg
        else:
            import yaml
            self.yaml = yaml.safe_load(Path(cfg).read_text())
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc:
            self.yaml["nc"] = nc
        self.model, self.save = parse_model(copy.deepcopy(self.yaml), ch=[ch])
        self.names = [str(i) for i in range(self.yaml["nc"])]
        self.inplace = self.yaml.get("inplace", True)
        head = self.model[-1]
        if isinstance(head, HEADS):
            s = 64
            out = self.forward(self.example_input(ch, s))
            maps = out[0] if isinstance(out[0], (list, tuple)) else out
            head.stride = torch.tensor([s / x.shape[-2] for x in maps])
            self.stride = head.stride
        initialize_weights(self)

    def example_input(self, ch, s):
        return torch.zeros(1, ch, s, s)

    def forward(self, x, augment=False, profile=False, visualize=False):
        return self._forward_once(x)

    def _forward_once(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x
'''


@dataclass
class Fork:
    """One fork: its config, the code it adds, and how the test checks its conversion."""

    name: str
    config: dict
    common: str = ""  # appended to models/common.py
    yolo: str = ""  # appended to models/yolo.py (may redefine CHANNEL_BLOCKS, BUILD_OTHER, heads ...)
    files: dict[str, str] = field(default_factory=dict)  # more files (path -> text)
    #: the main half of the head: its inputs (from its ``f``) and submodules, for the independent count
    main_towers: tuple[str, ...] = ("cv4", "cv5", "dfl2")
    rules: str | None = None  # a rule file for --rules yolov9 FILE
    image: int = 64


def write_tree(root: Path, fork: Fork) -> Path:
    """Write ``fork``'s source tree into ``root`` (the folder that will hold ``models/``)."""
    (root / "models").mkdir(parents=True)
    (root / "utils").mkdir()
    (root / "models" / "__init__.py").write_text("")
    (root / "utils" / "__init__.py").write_text("")
    (root / "utils" / "general.py").write_text(GENERAL)
    (root / "models" / "common.py").write_text(COMMON + textwrap.dedent(fork.common))
    (root / "models" / "yolo.py").write_text(YOLO + textwrap.dedent(fork.yolo))
    for name, text in fork.files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


#: Builds each tree's training model with the tree's own code and saves it the way train_dual.py
#: does (fp16 model and EMA, names dict, optimizer state, opt, ...). argv: JSON list of
#: [tree, config.yaml, out.pt, seed].
BUILD_SCRIPT = r'''
import copy, json, sys
from datetime import datetime
import torch
import yaml

def purge():
    for name in list(sys.modules):
        if name.split(".")[0] in ("models", "utils"):
            del sys.modules[name]

for tree, cfg, out, seed in json.loads(sys.argv[1]):
    purge()
    sys.path.insert(0, tree)
    from models.yolo import DetectionModel
    torch.manual_seed(seed)
    model = DetectionModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    model.nc = model.yaml["nc"]
    model.names = {i: f"class{i}" for i in range(model.nc)}
    model.hyp = {"lr0": 0.01, "box": 7.5}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ckpt = {"epoch": 3, "best_fitness": 0.25, "model": copy.deepcopy(model).half(),
            "ema": copy.deepcopy(model).half(), "updates": 12, "optimizer": optimizer.state_dict(),
            "opt": {"cfg": cfg, "epochs": 10, "imgsz": 64}, "git": None, "date": datetime.now().isoformat()}
    torch.save(ckpt, out)
    sys.path.remove(tree)
print("built")
'''

#: Loads each training checkpoint and its conversion with the tree's own classes (plain torch.load,
#: as the fork's detect.py does) and reports, per case: whether the converted model's output equals
#: the dual model's main output bitwise (fp32), the converted model's parameter count, and the count
#: of parameters reachable from the main half of the head, walked over the layers' ``f`` here.
#: argv: JSON list of [name, tree, in.pt, out.pt, main_towers, image, main_path].
CHECK_SCRIPT = r'''
import json, sys
import torch

def purge():
    for name in list(sys.modules):
        if name.split(".")[0] in ("models", "utils"):
            del sys.modules[name]

def reachable(layers, sources):
    seen, todo = set(), list(sources)
    while todo:
        j = todo.pop()
        if j in seen:
            continue
        seen.add(j)
        f = layers[j].f
        for k in ([f] if isinstance(f, int) else f):
            if j == 0 and k == -1:
                continue  # layer 0 reads the image
            todo.append(j + k if k < 0 else k)
    return seen

report = {}
for name, tree, src, out, towers, image, main_path in json.loads(sys.argv[1]):
    purge()
    sys.path.insert(0, tree)
    try:
        dual = torch.load(src, map_location="cpu", weights_only=False)["ema"].float().eval()
        converted = torch.load(out, map_location="cpu", weights_only=False)["model"].float().eval()
        gen, ch = torch.Generator().manual_seed(7), dual.yaml.get("ch", 3)
        x = [torch.rand(1, c, image, image, generator=gen) for c in ch] if isinstance(ch, list) else \
            torch.rand(1, ch, image, image, generator=gen)
        with torch.no_grad():
            want = dual(x)
            for k in main_path:
                want = want[k]
            got = converted(x)[0]
        layers = dual.model
        head = layers[-1]
        f = head.f
        main_inputs = f[len(f) // 2:]
        keep = reachable(layers, [len(layers) - 1 + k if k < 0 else k for k in main_inputs])
        expected = sum(p.numel() for j in keep for p in layers[j].parameters())
        expected += sum(p.numel() for t in towers for p in getattr(head, t).parameters())
        report[name] = {
            "equal": bool(torch.equal(want, got)), "shape": list(got.shape),
            "params": sum(p.numel() for p in converted.parameters()), "expected_params": expected,
            "classes": sorted({f"{type(m).__module__}.{type(m).__name__}" for m in converted.modules()}),
            "eps": {i: [m.eps for m in layer.modules() if isinstance(m, torch.nn.BatchNorm2d)]
                    for i, layer in enumerate(converted.model)},
            "dual_eps": {i: [m.eps for m in layer.modules() if isinstance(m, torch.nn.BatchNorm2d)]
                         for i, layer in enumerate(dual.model)},
        }
    except Exception as exc:
        report[name] = {"error": f"{type(exc).__name__}: {exc}"}
    sys.path.remove(tree)
print(json.dumps(report))
'''

#: The forks' own blocks (models/common.py additions): what the issue's case 1 lists, and more.
EXTRA_COMMON = '''

class RepBlock(nn.Module):
    """Multi-branch: 3x3 and 1x1 convolutions and (same width) a BatchNorm of the input, summed."""

    def __init__(self, c1, c2):
        super().__init__()
        self.dense = Conv(c1, c2, 3, act=False)
        self.point = Conv(c1, c2, 1, act=False)
        self.identity = nn.BatchNorm2d(c1) if c1 == c2 else None
        self.act = nn.SiLU()

    def forward(self, x):
        y = self.dense(x) + self.point(x)
        return self.act(y + self.identity(x) if self.identity is not None else y)


class Attention(nn.Module):
    """Channel then spatial attention around a residual convolution."""

    def __init__(self, c1, c2):
        super().__init__()
        hidden = max(c2 // 8, 4)
        self.cv = Conv(c1, c2, 3)
        self.fc1, self.fc2 = nn.Conv2d(c2, hidden, 1), nn.Conv2d(hidden, c2, 1)
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)
        self.add = c1 == c2

    def forward(self, x):
        y = self.cv(x)
        avg, peak = y.mean((2, 3), keepdim=True), y.amax((2, 3), keepdim=True)
        y = y * torch.sigmoid(self.fc2(F.relu(self.fc1(avg))) + self.fc2(F.relu(self.fc1(peak))))
        y = y * torch.sigmoid(self.spatial(torch.cat((y.mean(1, keepdim=True), y.amax(1, keepdim=True)), 1)))
        return x + y if self.add else y


class HyperConv(nn.Module):
    """Vertices and one global hyperedge: a pointwise convolution plus a pooled one, broadcast back."""

    def __init__(self, c1, c2):
        super().__init__()
        self.vertex = Conv(c1, c2, 1)
        self.edge = nn.Conv2d(c1, c2, 1)

    def forward(self, x):
        return self.vertex(x) + self.edge(F.adaptive_avg_pool2d(x, 1))


class Pyramid(nn.Module):
    """A backbone stage returning a list of feature maps (stride 2 and 4 of its input)."""

    def __init__(self, c1, c2s):
        super().__init__()
        self.a = Conv(c1, c2s[0], 3, 2)
        self.b = Conv(c2s[0], c2s[1], 3, 2)

    def forward(self, x):
        p = self.a(x)
        return [p, self.b(p)]


class Index(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x[self.k]


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class DomainClassifier(nn.Module):
    """Side branch: which domain a feature map comes from, behind a gradient-reversal layer."""

    def __init__(self, c1, n):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c1, n)

    def forward(self, x):
        return self.fc(self.pool(GradReverse.apply(x)).flatten(1))


class Shrink(nn.Module):
    """Keeps the values farther than a threshold from a learnt centre (a distance compared in fp16 files)."""

    def __init__(self, c1, threshold=0.05):
        super().__init__()
        self.center = nn.Parameter(torch.randn(1, c1, 1, 1) * 0.1)
        self.threshold = threshold

    def forward(self, x):
        return torch.where((x - self.center).abs() > self.threshold, x, torch.zeros_like(x))


class Mixer(nn.Module):
    """Config arguments no other code base understands: a dict, a string, a number."""

    def __init__(self, c1, spec, act, ratio):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c1, c1, k, padding=k // 2, groups=c1) for k in spec["k"])
        self.act = nn.GELU() if act == "gelu" else nn.SiLU()
        self.ratio = ratio

    def forward(self, x):
        return x + self.ratio * self.act(sum(conv(x) for conv in self.convs))
'''

#: How the forks' builder knows their blocks (models/yolo.py additions).
EXTRA_YOLO = '''

CHANNEL_BLOCKS = CHANNEL_BLOCKS + (RepBlock, Attention, HyperConv)


def BUILD_OTHER(m, f, args, ch, gw):
    c1 = ch[f if isinstance(f, int) else f[0]]
    if m in (Pyramid, DomainClassifier):
        args.insert(0, c1)
        return args[1]
    if m is Index:
        return c1[args[0]]
    if m in (Shrink, Mixer):
        args.insert(0, c1)
    return c1
'''
