"""Benchmark: fxrewrite's trace + rewrite + rebind against torch.fx's trace + dead-code elimination +
recompile, on module-heavy models (every node calls a module with its own tensors).

Run with ``python -m pytest benchmarks --benchmark-only`` (the normal test run does not collect
this folder; ``-k "not 100k"`` leaves out the largest size, about 4 minutes). Each model and size
is one benchmark group, so the two contenders are measured side by side in the same run; the
table after the run (``conftest.py``) gives the ratio fxrewrite / torch.fx per size and the growth
from one size to the next.

* ``chain``: ``main`` and ``side``, two ``nn.Sequential`` of Linear + ReLU + Identity layers of the
  same depth; ``forward`` calls both and returns ``main``'s output, so ``side`` is dead code.
  1k, 10k and 100k nodes.
* ``resnet``: residual blocks as in ResNet (a ``self.relu`` called twice, an ``nn.Identity``
  shortcut, Conv + BatchNorm) repeated, with an unused auxiliary classifier on every fourth
  block (deep supervision, as YOLOv9's PGI branch). 1k and 10k nodes.

The contenders, on the same model object (neither modifies it):

* torch.fx: ``symbolic_trace(model)``, ``graph.eliminate_dead_code()``, ``recompile()``;
* fxrewrite: ``trace(model)``, ``rewrite`` with ``prune_unreachable`` and ``collapse`` of the
  identities (fixed point), ``rebind(result)`` (fresh module tree over the original tensors, its
  code generated): what a user runs to get a standalone rewritten module with its parameter map.

The garbage of the previous round is collected before the clock starts (pedantic setup).
"""
from __future__ import annotations

import gc
from functools import lru_cache

import pytest
import torch
from torch import fx, nn

import fxrewrite
from fxrewrite import Pattern, Rule, RuleSet

RULES = RuleSet([
    Rule("keep-outputs", "prune_unreachable"),
    Rule("drop-identity", "collapse", Pattern(module_class="Identity"), mode="fixed_point"),
])
ROUNDS = {1_000: 5, 10_000: 3, 100_000: 1}


class Chain(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.main, self.side = self._branch(layers), self._branch(layers)

    @staticmethod
    def _branch(layers: int) -> nn.Sequential:
        modules: list[nn.Module] = []
        for _ in range(layers):
            modules += [nn.Linear(4, 4), nn.ReLU(), nn.Identity()]
        return nn.Sequential(*modules)

    def forward(self, x):
        self.side(x)  # computed by the traced graph, used by nothing: dead
        return self.main(x)


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu, self.shortcut = nn.ReLU(), nn.Identity()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + self.shortcut(x))


class ResNetLike(nn.Module):
    """Blocks of 8 nodes; every fourth has an auxiliary classifier (pool, flatten, linear) nobody reads."""

    def __init__(self, blocks: int, c: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(Block(c) for _ in range(blocks))
        self.aux = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3))
                                 for _ in range(0, blocks, 4))
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        aux = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i % 4 == 0:
                aux.append(self.aux[i // 4](x))  # deep supervision in training; dead at inference
        return self.head(x.mean((2, 3)))


@lru_cache(maxsize=None)
def model(kind: str, size: int) -> nn.Module:
    """About ``size`` nodes once traced (placeholder and output included)."""
    torch.manual_seed(0)
    if kind == "chain":
        return Chain(size // 6).eval()
    return ResNetLike(size * 4 // 35).eval()  # 4 blocks: 32 nodes + 3 aux = 35


def _fresh(kind: str, size: int):
    def setup():
        gc.collect()  # no garbage of the previous round left, whoever made it
        return (model(kind, size),), {}
    return setup


def fxrewrite_run(m: nn.Module):
    result = fxrewrite.rewrite(fxrewrite.trace(m), RULES)
    return result, fxrewrite.rebind(result)


def fx_run(m: nn.Module) -> fx.GraphModule:
    gm = fx.symbolic_trace(m)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


CASES = [("chain", 1_000), ("chain", 10_000), ("chain", 100_000), ("resnet", 1_000), ("resnet", 10_000)]
IDS = [f"{kind}-{size // 1000}k" for kind, size in CASES]


@pytest.mark.parametrize("kind, size", CASES, ids=IDS)
def test_fxrewrite_trace_rewrite_rebind(benchmark, kind, size):
    benchmark.group = f"modules {kind} {size // 1000}k nodes"
    benchmark.extra_info.update(size=size, contender="fxrewrite", table=f"module-heavy {kind}")
    result, rebound = benchmark.pedantic(fxrewrite_run, setup=_fresh(kind, size), rounds=ROUNDS[size],
                                         iterations=1, warmup_rounds=0)
    reference = fx_run(model(kind, size))
    kept = [n for n in reference.graph.nodes if n.op == "call_module"
            and not isinstance(reference.get_submodule(n.target), nn.Identity)]
    # The same nodes as torch.fx's dead-code elimination keeps, less the identities collapsed.
    assert [n.target for n in rebound.module.graph.nodes if n.op == "call_module"] == [n.target for n in kept]
    assert rebound.param_map == {name: name for name in rebound.module.state_dict()}
    assert set(rebound.param_map) == {f"{n.target}.{name}" for n in kept
                                      for name in reference.get_submodule(n.target).state_dict()}
    if size <= 10_000:
        x = torch.randn(2, 4) if kind == "chain" else torch.randn(1, 4, 6, 6)
        assert torch.equal(rebound.module(x), model(kind, size)(x))


@pytest.mark.parametrize("kind, size", CASES, ids=IDS)
def test_fx_trace_dce_recompile(benchmark, kind, size):
    benchmark.group = f"modules {kind} {size // 1000}k nodes"
    benchmark.extra_info.update(size=size, contender="torch.fx", table=f"module-heavy {kind}")
    gm = benchmark.pedantic(fx_run, setup=_fresh(kind, size), rounds=ROUNDS[size], iterations=1, warmup_rounds=0)
    assert not any(str(n.target).startswith("side.") for n in gm.graph.nodes)
