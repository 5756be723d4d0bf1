"""Fuzzing the rule loader and the rewrite engine (hypothesis, bounded: well under a minute).

Contracts:

* ``load_rules`` on any text or file returns a :class:`RuleSet` or raises :class:`RuleFileError`,
  nothing else, in bounded time and memory (alias bombs, deep nesting, huge numbers, odd tags,
  non-UTF-8 bytes included);
* ``rewrite`` with any rule set that loaded, on any small random model, either returns a valid
  module (``graph.lint`` passes, it runs on the example input, every output is computable) or
  raises :class:`RewriteError`; it never raises anything else and never changes its input
  (same graph, same tensor objects with the same values, same module tree);
* a rule that never reaches a fixed point stops after ``max_iterations`` with an error naming it,
  and an absurd ``max_iterations`` is refused.

``scripts/fuzz_rules.py`` runs the same strategies for longer.
"""
from __future__ import annotations

import re
import time
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxrewrite
from fxrewrite import Pattern, Rule, RuleFileError, RuleProblem, RuleSet
from fxrewrite.errors import RewriteError
from fxrewrite.rules import MAX_ITERATIONS_LIMIT

from helpers import fuzz_strategies as fs

FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


def load_contract(source, **kwargs) -> str:
    """``load_rules`` returns a RuleSet or raises a well-formed RuleFileError; anything else propagates."""
    try:
        ruleset = fxrewrite.load_rules(source, **kwargs)
    except RuleFileError as exc:
        assert exc.problems and all(isinstance(p, RuleProblem) for p in exc.problems)
        assert str(exc)
        return "refused"
    assert isinstance(ruleset, RuleSet) and len(ruleset) >= 0
    return "loaded"


# ---------------------------------------------------------------------------- the loader
@FAST
@given(fs.rule_documents())
def test_random_rule_files_load_or_are_refused(doc):
    load_contract(fs.dump(doc), name="<fuzz>")


@FAST
@given(fs.yaml_documents)
def test_random_yaml_documents_load_or_are_refused(doc):
    load_contract(fs.dump(doc) + "\n", name="<fuzz>")


@FAST
@given(st.text(max_size=300))
def test_random_text_loads_or_is_refused(text):
    load_contract(text + "\n", name="<fuzz>")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FAST
@given(data=fs.mutated_texts(st.sampled_from([fs.VALID_RULE_FILE, fs.HOSTILE_TEXTS["billion laughs (9 levels x 9)"],
                                               fs.HOSTILE_TEXTS["deep block nesting"][:600]])))
def test_mutated_rule_files_load_or_are_refused(scratch, data):
    path = scratch / "mutated.yaml"
    path.write_bytes(data)  # byte flips, truncations, insertions: often not UTF-8
    load_contract(path)
    load_contract(data.decode("latin-1") + "\n", name="<fuzz>")


@pytest.mark.parametrize("case", list(fs.HOSTILE_TEXTS))
def test_hostile_text_is_refused_in_bounded_time_and_memory(case):
    text = fs.HOSTILE_TEXTS[case]
    tracemalloc.start()
    started = time.perf_counter()
    try:
        outcome = load_contract(text, name="<hostile>")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    elapsed = time.perf_counter() - started
    assert elapsed < 30, f"{case}: {elapsed:.1f} s"  # generous for a loaded machine; ~5 s at worst idle
    assert peak < 100e6 + 4 * len(text), f"{case}: peak {peak / 1e6:.0f} MB"
    if case not in ("empty", "only a comment", "two documents"):
        assert outcome == "refused", case


def test_hostile_texts_name_the_problem():
    def message(case):
        with pytest.raises(RuleFileError) as err:
            fxrewrite.load_rules(fs.HOSTILE_TEXTS[case], name="f.yaml")
        return str(err.value)

    assert re.fullmatch(r"f\.yaml:\d+: refused: the document expands to more than 1,000,000 nodes and characters "
                        r"\(aliases repeated too often\?\)", message("billion laughs (9 levels x 9)"))
    assert message("merge-key bomb").startswith("f.yaml:") and "expands to more than" in message("merge-key bomb")
    assert message("recursive alias") == ("f.yaml:1: refused: an alias refers to a node that contains it "
                                          "(a recursive structure)")
    assert message("deep flow nesting") == "f.yaml:1: refused: nested more than 64 levels deep"
    assert message("huge integer").startswith("f.yaml: not valid YAML: a value cannot be read (Exceeds the limit")
    assert message("huge max_iterations") == "f.yaml:1: 'max_iterations' must be at most 10000, not 1000000000000"
    assert message("impossible date") == "f.yaml: not valid YAML: a value cannot be read (day is out of range for month)"
    assert message("unhashable key") == "f.yaml:2: not valid YAML: a list cannot be a mapping key"
    assert message("python object tag").startswith("f.yaml:1: not valid YAML: could not determine a constructor")
    assert message("too large") == "f.yaml: too large for a rule file (3,000,013 characters; the limit is 1,000,000)"


@pytest.mark.parametrize("case", list(fs.HOSTILE_BYTES))
def test_files_that_are_not_utf8_are_refused(tmp_path, case):
    path = tmp_path / "rules.yaml"
    path.write_bytes(fs.HOSTILE_BYTES[case])
    with pytest.raises(RuleFileError) as err:
        fxrewrite.load_rules(path)
    assert str(err.value).startswith(f"{path}: cannot read: 'utf-8' codec can't decode byte")


@pytest.mark.parametrize("source", ["a" * 5000, "no\0such", "/" + "x/" * 3000])
def test_odd_paths_are_refused(source):
    assert load_contract(source) == "refused"


# ---------------------------------------------------------------------------- the engine
@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(fs.random_models(), fs.rule_documents())
def test_engine_applies_valid_rules_or_refuses(model_and_input, doc):
    model, x = model_and_input
    fs.check_rewrite_contract(model, x, fs.dump(doc))


RULE_FILES_THAT_ONCE_BROKE_THE_ENGINE = {  # each with what must happen now
    # prune_unreachable with a pattern matching the output node made the output read itself (an invalid
    # graph, returned unchecked); now the output node is never selected
    "prune selects the output node": ("rules:\n  - {name: a, action: prune_unreachable, pattern: {}}\n", "applied"),
    # checks called with arguments they do not take raised TypeError from inside the engine
    "check without its arguments": ("rules:\n  - {name: a, action: collapse, pattern: {module_class: Identity, "
                                    "capture: x}, checks: [{same_shape: [$x]}]}\n", "refused-file"),
    "check argument of the wrong type": ("rules:\n  - {name: a, action: collapse, pattern: {module_class: Identity},"
                                         " checks: [{not_output: 3}]}\n", "refused-rewrite"),
    # attrs with a non-string key made matching call getattr(module, 1)
    "attrs with an integer key": ("rules:\n  - {name: a, action: collapse, pattern: {module_class: Identity, "
                                  "attrs: {1: 2}}}\n", "refused-file"),
    # remove could delete the model's input (changing its signature, unchecked) or "remove" the output node
    "remove the input": ("rules:\n  - {name: a, action: remove, pattern: {op: placeholder}, args: {cascade: true}}\n",
                         "refused-rewrite"),
    "remove the output": ("rules:\n  - {name: a, action: remove, pattern: {op: output}}\n", "refused-rewrite"),
    # validation ran the shared modules: BatchNorm running statistics of the input changed
    "a rewrite that is validated": ("rules:\n  - {name: a, action: replace, pattern: {module_class: ReLU}, "
                                    "args: {with: nn.GELU}}\n", "applied"),
}


@pytest.mark.parametrize("case", list(RULE_FILES_THAT_ONCE_BROKE_THE_ENGINE))
def test_regressions_found_by_the_fuzzer(case):
    text, expected = RULE_FILES_THAT_ONCE_BROKE_THE_ENGINE[case]
    model = fs.RandomModel(2, [("identity", (0,), 2), ("relu", (1,), 2), ("batchnorm", (2,), 2)],
                           (1, [("linear", 3)]), seed=0).train()
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    assert fs.check_rewrite_contract(model, x, text) == expected


def test_rewrite_leaves_batchnorm_statistics_alone():
    """Shape validation runs the shared modules: a BatchNorm in training mode must not learn from it."""
    model = fs.RandomModel(2, [("batchnorm", (0,), 2), ("relu", (1,), 2)], (0, [("linear", 1)]), seed=0).train()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxrewrite.trace(model, x)
    result = fxrewrite.rewrite(gm, fxrewrite.load_rules(
        "rules:\n  - {name: gelu, action: replace, pattern: {module_class: ReLU}, args: {with: nn.GELU}}\n"))
    assert result.nodes_with_status("replaced") == ["layers_1"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())


# ---------------------------------------------------------------------------- resource limits
def ping_pong_model():
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())


def test_a_rule_that_never_settles_stops_and_is_named():
    """relu -> relu forever: each pass rewrites; the engine stops after max_iterations, naming the rule."""
    gm = fxrewrite.trace(ping_pong_model(), torch.zeros(1, 2))
    rules = fxrewrite.load_rules("max_iterations: 25\nrules:\n  - name: forever\n    pattern: {module_class: ReLU}\n"
                                 "    action: replace\n    args: {with: nn.ReLU}\n    mode: fixed_point\n")
    started = time.perf_counter()
    with pytest.raises(RewriteError) as err:
        fxrewrite.rewrite(gm, rules)
    assert time.perf_counter() - started < 20
    assert str(err.value) == ("rule 'forever': did not reach a fixed point after 25 iterations (each pass still "
                              "rewrote; raise max_iterations or fix the rule)")
    assert err.value.rule == "forever"


@pytest.mark.parametrize("value", [10**12, MAX_ITERATIONS_LIMIT + 1, 2**63])
def test_absurd_max_iterations_is_refused(value):
    with pytest.raises(RuleFileError) as err:
        fxrewrite.load_rules(f"max_iterations: {value}\nrules:\n  - {{name: a, action: collapse, "
                             "pattern: {module_class: Identity}}\n", name="f.yaml")
    assert str(err.value) == f"f.yaml:1: 'max_iterations' must be at most {MAX_ITERATIONS_LIMIT}, not {value}"
    rule = Rule("a", "collapse", Pattern(module_class="Identity"))
    with pytest.raises(RuleFileError) as err:
        RuleSet([rule], max_iterations=value)
    assert str(err.value) == f"<python>: max_iterations must be an integer from 1 to {MAX_ITERATIONS_LIMIT}, not {value}"


def test_the_largest_max_iterations_is_accepted():
    assert RuleSet([Rule("a", "collapse", Pattern(module_class="Identity"))],
                   max_iterations=MAX_ITERATIONS_LIMIT).max_iterations == MAX_ITERATIONS_LIMIT
