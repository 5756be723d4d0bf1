"""The verbs of RewriteContext (fxrewrite.context), each through a small user action: what it does to
the graph, node status, provenance, tensor origins and the rule's log."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite import Pattern, RewriteError, Rule, register_action
from fxrewrite.context import NEW, REMOVED
from fxrewrite.modules import copy_module
from fxrewrite.provenance import Provenance


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TwoLinear().eval()


X = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))


def run(model, action: str, pattern: Pattern, **args):
    return fxrewrite.rewrite(fxrewrite.trace(model, X), [Rule("r", action, pattern, args=args)])


def test_add_module_and_insert_call_make_a_new_node_with_new_tensors(scope, model):
    @register_action("test_ctx_scale_after")
    def scale_after(ctx, match):
        target = ctx.add_module(nn.Linear(3, 3, bias=False), "extra")
        with torch.no_grad():
            ctx.modules[target].weight.copy_(2 * torch.eye(3))
        node = ctx.insert_call(target, (match.root,), after=match.root, like=match.root)
        ctx.replace_uses(match.root, node)  # every reader but node itself

    result = run(model, "test_ctx_scale_after", Pattern(module_name="a"))
    assert [n.name for n in result.module.graph.nodes] == ["x", "a", "extra_0", "relu", "b", "output"]
    assert result.node_status["extra_0"] == NEW
    assert result.module.graph.find_nodes(op="call_module", target="extra_0")[0].meta["provenance"] == \
        Provenance("a", "Linear", ("a",), ("r",))
    assert result.param_map["extra_0.weight"] is None  # a new tensor
    torch.testing.assert_close(result.module(X), model.b(torch.relu(2 * model.a(X))))


def test_insert_call_of_a_function_and_set_args(scope, model):
    @register_action("test_ctx_negate_input")
    def negate_input(ctx, match):
        (source,) = match.root.args
        neg = ctx.insert_call(torch.neg, (source,), before=match.root)
        ctx.set_args(match.root, (neg,))

    result = run(model, "test_ctx_negate_input", Pattern(module_name="b"))
    assert [n.name for n in result.module.graph.nodes] == ["x", "a", "relu", "neg", "b", "output"]
    assert result.node_status == {"x": "kept", "a": "kept", "relu": "kept", "b": "kept", "output": "kept",
                                  "neg": "new"}
    assert result.module.graph.find_nodes(op="call_module", target="b")[0].meta["provenance"].rules == ("r",)
    assert torch.equal(result.module(X), model.b(-torch.relu(model.a(X))))


def test_set_module_record_origin_and_drop_tensors(scope, model):
    @register_action("test_ctx_merge")
    def merge(ctx, match, *, first):
        """b(a(x)) without the relu... as one linear whose weight is computed from both."""
        second = match.root
        a, b = ctx.module(first), ctx.module(second)
        new = copy_module(b)
        new.weight = nn.Parameter(b.weight.detach() @ a.weight.detach())
        new.bias = nn.Parameter(b.weight.detach() @ a.bias.detach() + b.bias.detach())
        ctx.set_module(second, new, {"weight": ("weight",), "bias": ("bias",)})
        # origins are of the *current* tensors: the bias first, while b.weight is still the old one
        ctx.record_origin(f"{second.target}.bias", ["b.weight", "b.bias", "a.bias"])
        ctx.record_origin(f"{second.target}.weight", [f"{second.target}.weight", f"{first.target}.weight"])
        ctx.drop_tensors(first.target)
        ctx.set_args(second, first.args)
        ctx.erase(first, REMOVED)

    class NoRelu(TwoLinear):
        def forward(self, x):
            return self.b(self.a(x))

    plain = NoRelu().eval()
    plain.load_state_dict(model.state_dict())
    result = run(plain, "test_ctx_merge", Pattern(module_name="b", inputs=[Pattern(capture="a")]), first="$a")
    assert result.param_map == {"b.weight": ("b.weight", "a.weight"), "b.bias": ("b.weight", "b.bias", "a.bias")}
    assert result.log[0].dropped == ["a.weight", "a.bias"]
    assert (result.node_status["b"], result.node_status["a"]) == ("replaced", "removed")
    assert [n.name for n in result.module.graph.nodes] == ["x", "b", "output"]
    torch.testing.assert_close(result.module(X), plain(X))


def test_refuse_and_note(scope, model):
    @register_action("test_ctx_refuse")
    def refuse(ctx, match, *, why):
        ctx.note(f"looked at {match.root.name}")
        ctx.refuse(why)

    with pytest.raises(RewriteError) as info:
        run(model, "test_ctx_refuse", Pattern(module_name="a"), why="not today")
    assert str(info.value) == "rule 'r': not today"


@pytest.mark.parametrize("call, message", [
    (lambda ctx, n: ctx.insert_call(torch.neg, (n,)), "insert_call needs exactly one of before= and after="),
    (lambda ctx, n: ctx.insert_call("nowhere", (n,), after=n), "insert_call: no module nowhere (add it with "
                                                               "add_module first)"),
    (lambda ctx, n: ctx.record_origin("z.weight", []), "record_origin: no tensor z.weight"),
    (lambda ctx, n: ctx.add_module(nn.ReLU(), "a.relu"), "add_module: 'a.relu' is not a plain name (a new module is "
                                                          "added at the top level)"),
    (lambda ctx, n: ctx.module(n.args[0]), "node relu is a call_function, not a module call"),
    (lambda ctx, n: ctx.erase(n.args[0], REMOVED), "cannot erase relu: it is still used by b"),
])
def test_misuse_is_refused_with_a_reason(scope, model, call, message):
    register_action("test_ctx_misuse", replace=True)(lambda ctx, match: call(ctx, match.root))
    with pytest.raises(RewriteError) as info:
        run(model, "test_ctx_misuse", Pattern(module_name="b"))
    assert str(info.value) == f"rule 'r': {message}"


def test_set_module_of_a_module_called_twice(scope):
    # Every call site replaced by equivalent modules: the module is replaced once (fxrewrite.call_sites);
    # only one of them: that one gets its own module, the other keeps the original.
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(self.lin(x))

    register_action("test_ctx_swap")(lambda ctx, match: ctx.set_module(match.root, nn.Identity(), {}))
    model = Twice()
    gm = fxrewrite.trace(model, X)
    result = fxrewrite.rewrite(gm, [Rule("r", "test_ctx_swap", Pattern(module_name="lin"))])
    assert [(n.name, n.target) for n in result.module.graph.nodes if n.op == "call_module"] == [
        ("lin", "lin"), ("lin_1", "lin")]
    assert type(result.module.lin) is nn.Identity and result.param_map == {}
    assert result.log[0].dropped == ["lin.weight", "lin.bias"]
    first = Pattern(module_name="lin", inputs=[Pattern(op="placeholder")])
    result = fxrewrite.rewrite(gm, [Rule("r", "test_ctx_swap", first)])
    assert [(n.name, n.target) for n in result.module.graph.nodes if n.op == "call_module"] == [
        ("lin", "lin_1"), ("lin_1", "lin")]
    assert type(result.module.lin_1) is nn.Identity and result.module.lin is model.lin
    assert result.param_map == {"lin.weight": "lin.weight", "lin.bias": "lin.bias"}
    assert result.log[0].dropped == []
    assert torch.equal(result.module(X), model.lin(X))
