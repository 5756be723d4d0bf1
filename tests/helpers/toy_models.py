"""Small hand-written models shared by the core tests (seeded, deterministic, CPU)."""
from __future__ import annotations

import torch
from torch import fx, nn


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise every parameter and floating buffer from a fixed seed; return the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in sorted(model.state_dict().items()):
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.abs_().add_(0.5)
    return model.eval()


def example(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- untraceable modules (each becomes an automatic leaf) -----------------------
class Loopy(nn.Module):
    """Iterates over its input: ``sum(x for x in xs)`` (a Proxy cannot be iterated)."""

    def forward(self, xs):
        return sum(x for x in xs)


class Lengthy(nn.Module):
    """Uses ``len()`` of its input."""

    def forward(self, x):
        return x * len(x)


class Branchy(nn.Module):
    """Python control flow on a traced value."""

    def forward(self, x):
        if x.sum() > 0:
            return x + 1
        return x - 1


class Scaled(nn.Module):
    """Has its own parameter, then fails: the partial graph (a get_attr) must be rolled back."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        y = x * self.scale
        for row in y:  # untraceable
            y = y + row
        return y


# -- traceable blocks ------------------------------------------------------------
class ConvAct(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


class Head(nn.Module):
    def __init__(self, c_in: int, classes: int = 5):
        super().__init__()
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class TwoBranch(nn.Module):
    """A shared stem, a main branch with identity layers and an auxiliary branch; returns (main, aux).

    Traced (torch builtins are leaves), its nodes are::

        x, stem_conv, stem_act, main_0_conv, main_0_act, main_1, main_2_conv, main_2_act,
        skip, add, mean, main_head_fc, aux_0_conv, aux_0_act, aux_1, mean_1, aux_head_fc, output
    """

    def __init__(self, width: int = 4, classes: int = 5):
        super().__init__()
        self.stem = ConvAct(3, width, 2)
        self.main = nn.Sequential(ConvAct(width, width), nn.Identity(), ConvAct(width, width))
        self.skip = nn.Identity()
        self.main_head = Head(width, classes)
        self.aux = nn.Sequential(ConvAct(width, 2 * width), nn.Identity())
        self.aux_head = Head(2 * width, classes)

    def forward(self, x):
        s = self.stem(x)
        m = self.main(s) + self.skip(s)
        return self.main_head(m), self.aux_head(self.aux(s))


class WithLeaf(nn.Module):
    """A conv, an untraceable module with a parameter (an automatic leaf), an identity, a linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.odd = Scaled()
        self.ident = nn.Identity()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.ident(self.odd(self.conv(x))))


class OldHead(nn.Module):
    """A head with a main conv (``cv4``) and an auxiliary conv (``aux``), concatenated."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.cv4 = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.aux = nn.Conv2d(c, c, 1)

    def forward(self, a, b):
        return torch.cat([self.cv4(a), self.aux(b)], 1)


class NewHead(nn.Module):
    """The inference form of :class:`OldHead`: only the main conv, now called ``cv2``, on one input."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.cv2 = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))

    def forward(self, a):
        return self.cv2(a)


class HeadNet(nn.Module):
    """Two convs feed an :class:`OldHead` (a leaf by class name when traced)."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.a = nn.Conv2d(3, c, 1)
        self.b = nn.Conv2d(3, c, 1)
        self.head = OldHead(c)

    def forward(self, x):
        return self.head(self.a(x), self.b(x))


class Chain(nn.Module):
    """conv(3->8) -> identity -> conv(8->8) -> relu: for refused rewrites (shapes known)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.ident = nn.Identity()
        self.c2 = nn.Conv2d(8, 8, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.c2(self.ident(self.c1(x))))


# -- helpers ---------------------------------------------------------------------------
class Snapshot:
    """Everything about a traced module that a rewrite must leave alone."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.code = gm.code
        self.graph = str(gm.graph)
        self.nodes = [(n.name, n.op, n.target, dict(n.meta)) for n in gm.graph.nodes]
        self.tensors = dict(gm.state_dict(keep_vars=True))
        self.values = {k: v.detach().clone() for k, v in self.tensors.items()}
        self.modules = dict(gm.named_modules())
        self.meta = dict(gm.meta)

    def assert_unchanged(self) -> None:
        gm = self.gm
        assert gm.code == self.code
        assert str(gm.graph) == self.graph
        assert [(n.name, n.op, n.target, dict(n.meta)) for n in gm.graph.nodes] == self.nodes
        now = gm.state_dict(keep_vars=True)
        assert list(now) == list(self.tensors)
        assert all(now[k] is self.tensors[k] for k in now)
        assert all(torch.equal(now[k], self.values[k]) for k in now)
        assert dict(gm.named_modules()) == self.modules
        assert gm.meta == self.meta
