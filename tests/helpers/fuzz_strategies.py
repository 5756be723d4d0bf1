"""Hypothesis strategies shared by the fuzz tests (tests/test_fuzz_*.py) and scripts/fuzz_rules.py.

* :func:`random_models`: small random DAG models (linear / relu / identity / dropout /
  batch norm / add / cat / mul / call_method / a get_attr parameter) with an auxiliary
  output, in train or eval mode;
* :func:`rule_documents`: structurally plausible rule files (random patterns, checks,
  actions with random arguments, modes), as Python data to dump with ``yaml.safe_dump``;
* :func:`mutated_texts`: byte flips, truncations, insertions and splices of rule files;
* :func:`yaml_documents`: random YAML values (nested lists/mappings of scalars);
* :func:`hostile_texts`: alias bombs, deep nesting, huge numbers, odd tags.

Also :func:`snapshot` / :func:`assert_unchanged` (a module and its graph are as before)
and :func:`check_rewrite_contract` (the engine's contract on one model and one rule file).
"""
from __future__ import annotations

import copy

import torch
import yaml
from hypothesis import strategies as st
from torch import fx, nn

import fxrewrite
from fxrewrite.examples import StepModel
from fxrewrite.errors import RewriteError, RuleFileError

# ---------------------------------------------------------------------------- models
KINDS = ["linear", "linear", "relu", "identity", "identity", "dropout", "batchnorm", "add", "cat", "mul",
         "method_relu", "scale"]


# The model a list of steps describes (fxrewrite.examples.StepModel, shared with tests/core/test_properties.py).
RandomModel = StepModel


@st.composite
def random_models(draw):
    """``(model, example input)``: a traced-able random DAG model, in train or eval mode."""
    model = RandomModel.random(lambda lo, hi: draw(st.integers(lo, hi)),
                               lambda options: draw(st.sampled_from(options)), KINDS)
    in_width = model.in_width
    model.train(draw(st.booleans()))
    batch = draw(st.integers(2, 3))  # BatchNorm1d in training mode needs more than one sample
    x = torch.randn(batch, in_width, generator=torch.Generator().manual_seed(draw(st.integers(0, 1000))))
    return model, x


# ---------------------------------------------------------------------------- rule files
# Each strategy takes ``noisy``: False draws only well-formed values (so that most rule files
# compile and reach the engine), True mixes in wrong types, unknown keys and odd values.
CAPTURES = ["x", "y", "z"]
REFS = ["$root", "$x", "$y", "$z"]
NOISY_REFS = REFS + ["$x.shape", "$x.weight", "$x.in_features", "$nothing", "x", 0]
MODULE_CLASSES = ["Linear", "ReLU", "Identity", "Dropout", "BatchNorm1d", "BatchNorm*", "Lin*", "*", "Conv2d",
                  "torch.nn.modules.linear.Linear", "Sequential"]
FUNCTIONS = ["add", "mul", "cat", "torch.cat", "operator.*", "*", "relu", "[a-z]*", "?"]
METHODS = ["relu", "view", "*", "r*"]
MODULE_NAMES = ["layers.*", "aux.*", "*", "layers.1", "aux", "[!a]*"]
REPLACEMENTS = ["nn.ReLU", "nn.Identity", "nn.GELU", "nn.Linear", "nn.Dropout", "nn.Sigmoid", "nn.BatchNorm1d",
                "nn.Module", "nn.Conv2d"]
NOISY_REPLACEMENTS = REPLACEMENTS + ["NoSuchClass", "nn.", "nn.functional", "nn.Parameter"]
SMALL_INTS = st.integers(-3, 5)
ODD_VALUES = st.sampled_from([None, True, 1.5, "text", [], {}, [1, [2]], {"a": 1}, -1, 10**30, "$x", "$root.shape"])


def _maybe_odd(strategy, noisy: bool):
    return st.one_of(strategy, ODD_VALUES) if noisy else strategy


def _count(noisy: bool):
    good = st.one_of(st.integers(0, 4), st.fixed_dictionaries({"min": st.integers(0, 3)},
                                                              optional={"max": st.integers(0, 4)}))
    return _maybe_odd(st.one_of(good, st.integers(-1, 4)) if noisy else good, noisy)


def patterns(noisy: bool = False, depth: int = 2):
    ops = ["call_module", "call_function", "call_method", "placeholder", "get_attr", "output"]
    fields = {
        "op": st.sampled_from(ops + ["bogus"] if noisy else ops),
        "function": st.sampled_from(FUNCTIONS),
        "method": st.sampled_from(METHODS),
        "module_class": st.sampled_from(MODULE_CLASSES),
        "module_name": st.sampled_from(MODULE_NAMES),
        "attrs": _maybe_odd(st.fixed_dictionaries({}, optional={
            "in_features": SMALL_INTS, "p": st.just(0.5), "training": st.booleans(), "inplace": st.booleans()}),
            noisy),
        "num_users": _count(noisy),
        "num_inputs": _count(noisy),
        "capture": _maybe_odd(st.sampled_from(CAPTURES), noisy),
    }
    if depth > 0:
        sub = st.one_of(st.none(), st.deferred(lambda: patterns(noisy, depth - 1)))
        fields["inputs"] = _maybe_odd(st.lists(sub, max_size=3), noisy)
    pattern = st.fixed_dictionaries({}, optional=fields)
    if noisy:
        return st.one_of(pattern, st.fixed_dictionaries({"unknown_key": st.just(1)}, optional=fields), ODD_VALUES)
    return pattern


def checks(noisy: bool = False, refs=None):
    ref = st.sampled_from(NOISY_REFS if noisy else refs or REFS)
    found = st.one_of(
        st.sampled_from(["passthrough", "not_output", "max_users"]),
        st.fixed_dictionaries({"passthrough": st.one_of(ref, st.none())}),
        st.fixed_dictionaries({"same_shape": st.lists(ref, min_size=2, max_size=2)}),
        st.fixed_dictionaries({"max_users": st.fixed_dictionaries({}, optional={"node": ref, "count": SMALL_INTS})}),
        st.fixed_dictionaries({"not_output": st.one_of(ref, st.none())}),
        st.fixed_dictionaries({"attr_equals": st.tuples(
            ref, st.sampled_from(["in_features", "p", "training", "missing"]), SMALL_INTS).map(list)}),
        st.fixed_dictionaries({"has_submodule": st.fixed_dictionaries(
            {}, optional={"node": ref, "name": st.sampled_from(["", "0", "weight", "a.b"]),
                          "cls": st.sampled_from(["Linear", "*", "[!L]*"])})}),
    )
    if not noisy:
        return found
    return st.one_of(
        found,
        st.just("no_such_check"),
        st.fixed_dictionaries({"same_shape": st.lists(ref, max_size=3)}),
        st.fixed_dictionaries({"max_users": st.one_of(
            st.fixed_dictionaries({"bogus": st.just(1)}, optional={"node": ref}), st.lists(ref, max_size=3))}),
        st.fixed_dictionaries({"attr_equals": st.fixed_dictionaries(
            {"node": ref, "name": st.sampled_from(["p", "x"]), "value": ODD_VALUES})}),
        st.dictionaries(st.sampled_from(["passthrough", "max_users", "has_submodule"]), ODD_VALUES,
                        min_size=1, max_size=2),
    )


def _outputs(noisy: bool):
    item = st.one_of(st.integers(-3, 3), st.lists(st.integers(-2, 2), min_size=1, max_size=3))
    return st.lists(_maybe_odd(item, noisy), max_size=3)


def actions(noisy: bool = False, refs=None):
    ref = st.sampled_from(NOISY_REFS if noisy else refs or REFS)
    init = st.one_of(
        st.just({}),
        st.fixed_dictionaries({"in_features": st.sampled_from([1, 2, 3, 4, 5, "$x.in_features",
                                                              "$kept_inputs.channels"]),
                               "out_features": st.integers(1, 5)}),
        st.fixed_dictionaries({"p": st.sampled_from([0.0, 0.5, 2.0, "$x.p"])}),
        st.fixed_dictionaries({"num_features": st.sampled_from([1, 2, 3, "$kept_inputs.channels"])}),
    )
    if noisy:
        init = st.one_of(init, st.dictionaries(st.sampled_from(["bogus", "inplace", "in_features"]), ODD_VALUES,
                                               max_size=2))
    found = st.one_of(
        st.tuples(st.just("collapse"), st.fixed_dictionaries({}, optional={"node": ref, "input": st.integers(-3, 3)})),
        st.tuples(st.just("remove"), st.fixed_dictionaries({}, optional={"node": ref, "cascade": st.booleans()})),
        st.tuples(st.just("prune_unreachable"), st.fixed_dictionaries({}, optional={"outputs": _outputs(noisy)})),
        st.tuples(st.just("replace"), st.fixed_dictionaries(
            {"with": st.sampled_from(NOISY_REPLACEMENTS if noisy else REPLACEMENTS)},
            optional={
                "node": ref,
                "inputs": st.one_of(st.lists(st.integers(-3, 3), max_size=3),
                                    st.sampled_from(["0:", ":-1", "1:", "::", "x:y", ""]),
                                    st.fixed_dictionaries({}, optional={"groups": SMALL_INTS, "keep": SMALL_INTS})),
                "init": init,
                "params": st.dictionaries(st.sampled_from(["", "weight", "0", "a"]),
                                          st.sampled_from(["", "weight", "bias", "b"]), max_size=2),
                "copy_attrs": st.lists(st.sampled_from(["training", "in_features", "p", "nothing"]), max_size=2),
                "strict": st.booleans(),
            })),
        st.tuples(st.just("fuse_conv_bn"), st.fixed_dictionaries({}, optional={
            "node": ref, "conv": st.sampled_from(["conv", "0", ""]), "bn": st.sampled_from(["bn", "1"]),
            "forward": st.sampled_from(["forward", "nothing"])})),
        st.tuples(st.just("fold_batchnorm"), st.fixed_dictionaries({"conv": ref, "bn": ref})),
    )
    if not noisy:
        return found
    return st.one_of(found, st.tuples(st.sampled_from(["no_such_action", "collapse", "replace"]), st.dictionaries(
        st.sampled_from(["node", "input", "cascade", "outputs", "with", "bogus"]), ODD_VALUES, max_size=2)))


def _captures(pattern) -> list[str]:
    if not isinstance(pattern, dict):
        return []
    found = [pattern["capture"]] if isinstance(pattern.get("capture"), str) else []
    for sub in pattern.get("inputs") or [] if isinstance(pattern.get("inputs"), list) else []:
        found += _captures(sub)
    return found


@st.composite
def rules(draw, noisy: bool = False, odd_refs: bool = False):
    """One rule; when not noisy, its checks and arguments only refer to captures its pattern binds
    (``odd_refs``: also to their shapes, attributes and names that resolve to no node)."""
    pattern = draw(patterns(noisy)) if noisy or draw(st.integers(0, 9)) < 9 else None
    refs = ["$root"] + [f"${c}" for c in _captures(pattern)]
    if odd_refs:
        refs += [f"{r}.{attr}" for r in refs for attr in ("shape", "weight", "in_features", "training", "op")]
        refs += [0, "root", "$root.shape.0"]
    action, args = draw(actions(noisy, refs))
    names = ["a", "b", "c", "rule-with-a-long-name"] + (["", 1] if noisy else [])
    rule = {"name": draw(st.sampled_from(names)), "action": action}
    if pattern is not None and (not noisy or draw(st.integers(0, 9)) < 8):
        rule["pattern"] = pattern
    if args or draw(st.booleans()):
        rule["args"] = args
    if draw(st.booleans()):
        rule["checks"] = draw(st.lists(checks(noisy, refs), max_size=3))
    if draw(st.booleans()):
        rule["mode"] = draw(st.sampled_from(["once", "fixed_point", "fixed_point"] + (["sometimes"] if noisy else [])))
    return rule


@st.composite
def rule_documents(draw, noisy: bool | None = None):
    """A rule file as Python data (``yaml.safe_dump`` it); ``noisy=None``: one file in four is noisy,
    one in four refers to odd values (shapes, attributes) where nodes are expected."""
    level = draw(st.integers(0, 3))
    if noisy is None:
        noisy = level == 0
    items = draw(st.lists(rules(noisy, odd_refs=level == 1), min_size=1, max_size=4))
    seen: set = set()
    for i, rule in enumerate(items):  # duplicate names are a (tested) error of their own: keep them rare
        if rule["name"] in seen and not noisy:
            rule["name"] = f"{rule['name']}{i}"
        seen.add(rule["name"])
    doc: dict = {"rules": items}
    if draw(st.integers(0, 4)) == 0:
        doc["max_iterations"] = draw(st.integers(1, 20) if not noisy
                                     else st.sampled_from([0, -1, 10**12, 1.5, "x", 3]))
    if noisy and draw(st.integers(0, 4)) == 0:
        doc[draw(st.sampled_from(["plugins", "extra_key", "description"]))] = draw(ODD_VALUES)
    return doc


def dump(doc) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


# ---------------------------------------------------------------------------- texts
VALID_RULE_FILE = """\
max_iterations: 7
rules:
  - name: drop-identity
    pattern: {module_class: Identity, capture: x}
    checks:
      - passthrough: $x
    action: collapse
    mode: fixed_point
  - name: keep-main
    action: prune_unreachable
    args: {outputs: [0]}
  - name: relu-to-gelu
    pattern: {module_class: ReLU, num_users: {min: 1}}
    action: replace
    args: {with: nn.GELU}
"""

yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                         st.text(max_size=20), st.sampled_from(["$x", "$root", "collapse", "Identity", "rules"]))
yaml_documents = st.recursive(
    yaml_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.one_of(st.sampled_from(["rules", "name", "action", "pattern", "args",
                                                                          "checks", "mode", "max_iterations"]),
                                                         st.text(max_size=8)), children, max_size=4)),
    max_leaves=25,
)


@st.composite
def mutated_texts(draw, seeds=(VALID_RULE_FILE,)):
    """Bytes of a rule file after random byte flips, deletions, insertions, truncation or splicing."""
    data = bytearray(draw(st.sampled_from(seeds)).encode() if not isinstance(seeds, st.SearchStrategy)
                     else draw(seeds).encode())
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "duplicate", "splice_token"]))
        if not data:
            data += b"\n"
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 8))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "truncate":
            del data[i:]
        elif op == "duplicate":
            j = draw(st.integers(i, min(len(data), i + 40)))
            data[j:j] = data[i:j]
        else:
            data[i:i] = draw(st.sampled_from([b"&a ", b"*a", b"<<: ", b"!!binary ", b"!!python/object:os.system ",
                                              b"[", b"{", b"? ", b"- ", b"\t", b"%YAML 1.1\n", b"---\n", b"...\n",
                                              b"\xff\xfe", b"\x00", b"9" * 40, b"1e999", b".nan", b"~",
                                              b"2001-02-30", b"0x_", b"!!set {a, b}", b"'", b'"\\x']))
    return bytes(data)


def alias_bomb(levels: int, fanout: int, tail: str = "rules: *l{last}\n") -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * fanout)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fanout)}]")
    return "\n".join(lines) + "\n" + tail.format(last=levels - 1)


def merge_bomb(levels: int, fanout: int) -> str:
    lines = ["m0: &m0 {k: 1}"]
    for i in range(1, levels):
        lines.append(f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * fanout)}]}}")
    return "\n".join(lines) + "\nrules: []\n"


HOSTILE_TEXTS = {
    "billion laughs (9 levels x 9)": alias_bomb(9, 9),
    "billion laughs as an action argument": alias_bomb(
        8, 10, "rules:\n  - name: a\n    action: prune_unreachable\n    args: {{outputs: *l{last}}}\n"),
    "billion laughs as a count": alias_bomb(
        8, 10, "rules:\n  - name: a\n    action: collapse\n    pattern: {{module_class: Identity, num_users: *l{last}}}\n"),
    "long string repeated by aliases": "s: &s " + "x" * 100_000 + "\nrules: [" + ", ".join(["*s"] * 100) + "]\n",
    "merge-key bomb": merge_bomb(9, 9),
    "recursive alias": "rules: &r [*r]\n",
    "recursive mapping": "rules: &r {a: *r}\n",
    "deep flow nesting": "rules: " + "[" * 20_000 + "]" * 20_000 + "\n",
    "deep block nesting": "rules:\n" + "".join("  " * i + "- \n" for i in range(1, 500)),
    "deep mapping nesting": "rules: " + "{a: " * 5_000 + "1" + "}" * 5_000 + "\n",
    "huge integer": "max_iterations: " + "9" * 10_000 + "\nrules: []\n",
    "huge max_iterations": "max_iterations: 1000000000000\nrules:\n  - {name: a, action: collapse, "
                           "pattern: {module_class: Identity}}\n",
    "float overflow": "max_iterations: 1e999\nrules: []\n",
    "impossible date": "rules:\n  - name: 2001-02-30\n    action: collapse\n",
    "unhashable key": "rules:\n  - {[1, 2]: 3, name: a, action: collapse}\n",
    "set as a key": "rules:\n  - {? !!set {a, b} : 3, name: a, action: collapse}\n",
    "python object tag": "rules: !!python/object/apply:os.system ['touch /tmp/fxrewrite-pwned']\n",
    "python name tag": "rules: !!python/name:os.system\n",
    "bad binary": "rules: !!binary '%%%'\n",
    "two documents": "rules: []\n---\nrules: []\n",
    "NUL byte": "rules:\x00 []\n",
    "empty": "\n",
    "only a comment": "# nothing\n",
    "a scalar": "42\n",
    "tabs": "rules:\n\t- name: a\n",
    "directive": "%YAML 9.9\n---\nrules: []\n",
    "many keys": "rules: []\n" + "".join(f"k{i}: {i}\n" for i in range(5_000)),
    "too large": "# " + "x" * 3_000_000 + "\nrules: []\n",
}
HOSTILE_BYTES = {
    "latin-1 text": "rules:\n  - name: café\n    action: collapse\n".encode("latin-1"),
    "UTF-16": VALID_RULE_FILE.encode("utf-16"),
    "random binary": bytes(range(256)) * 4,
    "invalid UTF-8 sequence": b"rules:\n  - name: \xc3\x28\n    action: collapse\n",
}


# ---------------------------------------------------------------------------- contract checks
def snapshot(module: nn.Module):
    """Everything about a module a rewrite must leave alone."""
    graph = getattr(module, "graph", None)
    return {
        "tensors": {k: (v, v.detach().clone()) for k, v in module.state_dict(keep_vars=True).items()},
        "modules": [(name, type(m), m.training, dict(m._parameters), dict(m._buffers), dict(m._modules))
                    for name, m in module.named_modules()],
        "nodes": None if graph is None else [(n.name, n.op, n.target, repr(n.args), repr(n.kwargs),
                                              sorted(n.meta)) for n in graph.nodes],
        "code": getattr(module, "code", None),
    }


def assert_unchanged(module: nn.Module, before) -> None:
    after = snapshot(module)
    assert after["modules"] == before["modules"], "the module tree changed"
    assert after["nodes"] == before["nodes"], "the graph changed"
    assert after["code"] == before["code"], "the generated code changed"
    assert set(after["tensors"]) == set(before["tensors"]), "the state_dict keys changed"
    for name, (obj, value) in before["tensors"].items():
        now = after["tensors"][name][0]
        assert now is obj, f"{name}: a different tensor object"
        assert now.shape == value.shape and now.dtype == value.dtype, f"{name}: shape/dtype changed"
        assert torch.equal(now.detach(), value) or (value.isnan().any() and torch.equal(now.isnan(), value.isnan())), \
            f"{name}: values changed"


def check_rewrite_contract(model: nn.Module, x: torch.Tensor, text: str) -> str:
    """Load ``text`` as rules and rewrite ``model``'s trace with them; check the engine's contract.

    Returns the outcome: ``"refused-file"`` (RuleFileError), ``"refused-rewrite"`` (RewriteError) or
    ``"applied"``. Any other exception propagates (a failure of the contract); a result that is
    not valid, or a changed input, fails an assertion.
    """
    try:
        ruleset = fxrewrite.load_rules(text, name="<fuzz>")
    except RuleFileError:
        return "refused-file"
    gm = fxrewrite.trace(model, x)
    before_model, before_gm = snapshot(model), snapshot(gm)
    try:
        result = fxrewrite.rewrite(gm, ruleset)
    except RewriteError:
        result = None
    # Checked before the result runs: it shares the input's modules, and running a BatchNorm in
    # training mode updates running statistics (the caller's business, not the engine's).
    assert_unchanged(model, before_model)
    assert_unchanged(gm, before_gm)
    if result is None:
        outcome = "refused-rewrite"
    else:
        outcome = "applied"
        out_gm = result.module
        out_gm.graph.lint()
        for node in out_gm.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                out_gm.get_submodule(node.target) if node.op == "call_module" else _get_attr(out_gm, node.target)
        with torch.no_grad():
            out = out_gm(x.clone())
        fx.node.map_aggregate(out, _computed)
        assert set(result.param_map) == {name for name, _ in fxrewrite.tensors.named_tensors(out_gm)}
    return outcome


def _get_attr(module, target):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _computed(value):
    if isinstance(value, torch.Tensor):
        assert value.device.type == "cpu" and not value.is_meta
        value.sum().item()  # materialised and readable
    return value


def deepcopy_model(model):
    return copy.deepcopy(model)
