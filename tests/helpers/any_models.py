"""Small versions of common image-model architectures, written here (torchvision does not run on
the test machine): what a user of fxrewrite on "any model" brings.

* :class:`ResNet`: basic residual blocks that call one ``self.relu`` twice (after the first
  convolution and after the residual addition), a strided block with a downsample branch;
* :class:`MobileNetV3`: inverted residuals with depthwise convolutions, squeeze-excite
  (``AdaptiveAvgPool2d``, two 1x1 convolutions, ``Hardsigmoid``, a multiplication) and hard-swish;
* :class:`EfficientNet`: MBConv blocks with SiLU, squeeze-excite and stochastic depth (random in
  training, the identity in eval);
* :class:`RegNet`: X blocks (1x1, grouped 3x3, 1x1) with their own activation modules;
* :class:`FrozenFPN`: a backbone normalised by :class:`FrozenBatchNorm2d` (buffers only, computed
  in its forward) and a feature pyramid returning a dict ``{"p3", "p4", "p5"}``;
* :func:`deep_chain`: an ``nn.Sequential`` of Linear + ReLU + Identity layers.

Every model is built from a seed with non-trivial BatchNorm statistics (folding an untrained
BatchNorm would hide a wrong fold).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(c1: int, c2: int, k: int = 3, s: int = 1, groups: int = 1, dims: int = 2) -> list[nn.Module]:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    return [conv(c1, c2, k, s, k // 2, groups=groups, bias=False), bn(c2)]


class BasicBlock(nn.Module):
    def __init__(self, c1: int, c2: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(c1, c2, 3, stride)
        self.conv2, self.bn2 = conv_bn(c2, c2, 3)
        self.relu = nn.ReLU()  # called twice: the most common shared module
        self.downsample = nn.Sequential(*conv_bn(c1, c2, 1, stride)) if stride != 1 or c1 != c2 else None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(3, 8, 3, 1)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int, gate: type[nn.Module] = nn.Hardsigmoid, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.act, self.fc2, self.gate = nn.Conv2d(c, squeeze, 1), act(), nn.Conv2d(squeeze, c, 1), gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    def __init__(self, c1: int, expand: int, c2: int, stride: int = 1, se: bool = True):
        super().__init__()
        self.expand = nn.Sequential(*conv_bn(c1, expand, 1), nn.Hardswish())
        self.depthwise = nn.Sequential(*conv_bn(expand, expand, 3, stride, groups=expand), nn.Hardswish())
        self.se = SqueezeExcite(expand, max(expand // 4, 2)) if se else nn.Identity()
        self.project = nn.Sequential(*conv_bn(expand, c2, 1))
        self.residual = stride == 1 and c1 == c2

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV3(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8, 3, 2), nn.Hardswish())
        self.blocks = nn.Sequential(InvertedResidual(8, 16, 8), InvertedResidual(8, 24, 12, 2),
                                    InvertedResidual(12, 24, 12, se=False))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 16), nn.Hardswish(),
                                  nn.Dropout(0.2), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class StochasticDepth(nn.Module):
    """Drops the whole residual branch of a sample with probability ``p`` in training; the identity in eval."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class MBConv(nn.Module):
    def __init__(self, c1: int, c2: int, expand: int, stride: int, p: float):
        super().__init__()
        mid = c1 * expand
        self.block = nn.Sequential(*conv_bn(c1, mid, 1), nn.SiLU(), *conv_bn(mid, mid, 3, stride, groups=mid), nn.SiLU(),
                                   SqueezeExcite(mid, max(c1 // 4, 1), nn.Sigmoid, nn.SiLU), *conv_bn(mid, c2, 1))
        self.drop = StochasticDepth(p)
        self.residual = stride == 1 and c1 == c2

    def forward(self, x):
        y = self.block(x)
        return x + self.drop(y) if self.residual else y


class EfficientNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8, 3, 2), nn.SiLU())
        self.stages = nn.Sequential(MBConv(8, 8, 1, 1, 0.1), MBConv(8, 12, 4, 2, 0.1), MBConv(12, 12, 4, 1, 0.2))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(12, classes)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


class XBlock(nn.Module):
    def __init__(self, c1: int, c2: int, stride: int, group_width: int = 4):
        super().__init__()
        self.a = nn.Sequential(*conv_bn(c1, c2, 1), nn.ReLU())
        self.b = nn.Sequential(*conv_bn(c2, c2, 3, stride, groups=c2 // group_width), nn.ReLU())
        self.c = nn.Sequential(*conv_bn(c2, c2, 1))
        self.proj = nn.Sequential(*conv_bn(c1, c2, 1, stride)) if stride != 1 or c1 != c2 else None
        self.activation = nn.ReLU()

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.c(self.b(self.a(x))))


class RegNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8, 3, 2), nn.ReLU())
        self.trunk = nn.Sequential(XBlock(8, 8, 1), XBlock(8, 16, 2), XBlock(16, 16, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.trunk(self.stem(x)))


class FrozenBatchNorm2d(nn.Module):
    """A BatchNorm with fixed statistics and affine parameters, all buffers (detection backbones use it)."""

    def __init__(self, c: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(c))
        self.register_buffer("bias", torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class FrozenStage(nn.Module):
    def __init__(self, c1: int, c2: int, stride: int):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(c1, c2, 3, stride, 1, bias=False), FrozenBatchNorm2d(c2), nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class FrozenFPN(nn.Module):
    """A frozen-BN backbone (3 stages) and a top-down feature pyramid; a dict of three levels out."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = FrozenStage(3, 8, 2)
        self.c3, self.c4, self.c5 = FrozenStage(8, 8, 2), FrozenStage(8, 16, 2), FrozenStage(16, 24, 2)
        self.lateral = nn.ModuleDict({"p3": nn.Conv2d(8, width, 1), "p4": nn.Conv2d(16, width, 1),
                                      "p5": nn.Conv2d(24, width, 1)})
        self.smooth = nn.ModuleDict({k: nn.Conv2d(width, width, 3, 1, 1) for k in ("p3", "p4", "p5")})

    def forward(self, x):
        c3 = self.c3(self.stem(x))
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        p5 = self.lateral["p5"](c5)
        p4 = self.lateral["p4"](c4) + F.interpolate(p5, scale_factor=2.0, mode="nearest")
        p3 = self.lateral["p3"](c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        return {"p3": self.smooth["p3"](p3), "p4": self.smooth["p4"](p4), "p5": self.smooth["p5"](p5)}


def deep_chain(layers: int, width: int = 4) -> nn.Sequential:
    """Linear + ReLU + Identity, ``layers`` times."""
    modules: list[nn.Module] = []
    for _ in range(layers):
        modules += [nn.Linear(width, width), nn.ReLU(), nn.Identity()]
    return nn.Sequential(*modules)


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with seeded random weights and BatchNorm statistics far from the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
                c = m.running_mean.shape[0]
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def build(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomised(cls(), seed).eval()


IMAGE_MODELS = {"resnet": ResNet, "mobilenetv3": MobileNetV3, "efficientnet": EfficientNet, "regnet": RegNet,
                "frozen-fpn": FrozenFPN}


def image(seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
