"""Benchmark: fxrewrite's ``prune_unreachable`` + ``collapse`` against ``torch.fx.Graph.eliminate_dead_code``.

Run with ``python -m pytest benchmarks --benchmark-only`` (the normal test run does
not collect this folder). Each size is one benchmark group, so the two contenders
are reported side by side; ``conftest.py`` adds a table with the ratio
fxrewrite / fx per size and the growth factor from one size to the next.

The graphs are synthetic ``torch.fx`` graphs built directly from ``call_function``
nodes (no modules, no trace metadata): a chain of ``torch.relu`` / ``torch.neg``
with ``operator.add`` skip connections, pass-through ``identity`` nodes, and
dead two-node branches. A fresh graph is built for every round (pedantic setup),
so every round rewrites an untouched graph, and the garbage of the previous round
is collected before the clock starts (otherwise the contender that allocates more,
fxrewrite, pays for collecting the other rounds' graphs).

* fx: ``gm.graph.eliminate_dead_code()`` (in place; lints the graph first);
* fxrewrite: ``rewrite(gm, [prune_unreachable, collapse identity (fixed point)])``,
  which copies the graph (the input is never modified), prunes the dead
  branches, collapses the identities, validates (lint) after each rule and
  returns a new GraphModule with its parameter map and node status.
"""
from __future__ import annotations

import gc
import operator

import pytest
import torch
from torch import fx

import fxrewrite
from fxrewrite import Pattern, Rule, RuleSet

SIZES = [1_000, 10_000, 100_000]
ROUNDS = {1_000: 30, 10_000: 10, 100_000: 4}

RULES = RuleSet([
    Rule("keep-outputs", "prune_unreachable"),
    Rule("drop-identity", "collapse", Pattern(op="call_function", function="identity"), mode="fixed_point"),
])


def identity(x):
    """A pass-through function: the nodes calling it are what ``collapse`` removes."""
    return x


def build(size: int) -> fx.GraphModule:
    """A GraphModule of exactly ``size`` nodes (placeholder and output included).

    A repeating block of 10 nodes: relu, identity, add (skip), relu, relu + add
    (a dead branch), identity, relu, neg, identity. Per block, 2 nodes are dead
    and 3 are identities.
    """
    graph = fx.Graph()
    prev = skip = graph.placeholder("x")
    body = size - 2
    made = 0
    while made < body:
        step = made % 10
        if step in (0, 3, 7):
            prev = graph.call_function(torch.relu, (prev,))
        elif step in (1, 6, 9):
            prev = graph.call_function(identity, (prev,))
        elif step == 2:
            prev = skip = graph.call_function(operator.add, (prev, skip))
        elif step == 4 and body - made >= 2:  # a dead branch: relu -> add, used by nothing
            dead = graph.call_function(torch.relu, (prev,))
            graph.call_function(operator.add, (dead, prev))
            made += 1
        else:
            prev = graph.call_function(torch.neg, (prev,))
        made += 1
    graph.output(prev)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert len(gm.graph.nodes) == size
    return gm


def expected_counts(size: int) -> tuple[int, int]:
    """(dead nodes, identity nodes) in ``build(size)``."""
    gm = build(size)
    dead = sum(1 for n in gm.graph.nodes if n.op == "call_function" and not n.users)
    identities = sum(1 for n in gm.graph.nodes if n.target is identity)
    return 2 * dead, identities


def _fresh(size: int):
    def setup():
        gm = build(size)
        gc.collect()  # start every round with no garbage left from the previous one, whoever allocates
        return (gm,), {}
    return setup


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s // 1000}k")
def test_fxrewrite_prune_collapse(benchmark, size):
    benchmark.group = f"prune {size // 1000}k nodes"
    benchmark.extra_info.update(size=size, contender="fxrewrite")
    result = benchmark.pedantic(lambda gm: fxrewrite.rewrite(gm, RULES), setup=_fresh(size),
                                rounds=ROUNDS[size], iterations=1, warmup_rounds=0)
    dead, identities = expected_counts(size)
    assert len(result.module.graph.nodes) == size - dead - identities
    assert len(result.nodes_with_status("pruned")) == dead
    assert len(result.nodes_with_status("collapsed")) == identities
    assert not any(n.target is identity for n in result.module.graph.nodes)
    assert result.param_map == {}
    if size <= 10_000:
        x = torch.randn(5, generator=torch.Generator().manual_seed(0))
        assert torch.equal(result.module(x), build(size)(x))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s // 1000}k")
def test_fx_eliminate_dead_code(benchmark, size):
    benchmark.group = f"prune {size // 1000}k nodes"
    benchmark.extra_info.update(size=size, contender="torch.fx")

    def run(gm):
        gm.graph.eliminate_dead_code()
        return gm

    gm = benchmark.pedantic(run, setup=_fresh(size), rounds=ROUNDS[size], iterations=1, warmup_rounds=0)
    dead, _ = expected_counts(size)
    assert len(gm.graph.nodes) == size - dead
