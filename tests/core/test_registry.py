"""Registries (fxrewrite.registry): duplicates refused, replace=True, scopes, rule sets checked against
an explicit registry and running what they were checked with."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite import Pattern, RegistrationError, Rule, RuleFileError, RuleSet, registry
from fxrewrite.registry import BUILTINS, DEFAULT, Registry, register_action, register_check, register_module_class


def note(ctx, match, text="a"):
    ctx.note(text)


def other_note(ctx, match, text="b"):
    ctx.note(text.upper())


def test_the_built_ins_are_in_their_own_registry():
    assert BUILTINS.action_names() == ["collapse", "fold_batchnorm", "fuse_conv_bn", "prune_unreachable", "remove",
                                       "replace"]
    assert BUILTINS.check_names() == ["attr_equals", "has_submodule", "max_users", "not_output", "passthrough",
                                      "same_shape"]
    assert DEFAULT.parent is BUILTINS and registry.current() is DEFAULT
    assert registry.action("collapse") is BUILTINS.action("collapse")


def test_a_name_registered_twice_is_an_error_unless_replace(scope):
    register_action("test_reg_note")(note)
    with pytest.raises(RegistrationError) as info:
        register_action("test_reg_note")(other_note)
    assert str(info.value) == ("action 'test_reg_note' is already registered (as test_registry.note, not "
                               "test_registry.other_note); pass replace=True to replace it")
    register_action("test_reg_note")(note)  # the same function again: nothing to do
    register_action("test_reg_note", replace=True)(other_note)
    assert registry.action("test_reg_note").fn is other_note


def test_a_built_in_can_only_be_shadowed_with_replace(scope):
    with pytest.raises(RegistrationError, match="action 'collapse' is already registered"):
        register_action("collapse")(note)
    with pytest.raises(RegistrationError, match="check 'passthrough' is already registered"):
        register_check("passthrough")(lambda ctx, match: None)
    register_action("collapse", replace=True)(note)
    assert scope.action("collapse").fn is note and BUILTINS.action("collapse").fn is not note


def test_module_classes_too(scope):
    class Swish(nn.Module):
        pass

    class OtherSwish(nn.Module):
        pass

    register_module_class(Swish)
    register_module_class(Swish)  # again: fine
    with pytest.raises(RegistrationError, match="module class 'Swish' is already registered"):
        register_module_class(OtherSwish, "Swish")
    register_module_class(OtherSwish, "Swish", replace=True)
    assert registry.module_class("Swish") is OtherSwish
    assert registry.module_class("nn.ReLU") is nn.ReLU and registry.module_class("torch.nn.Nope") is None


def test_what_a_scope_registers_is_gone_after_it():
    with registry.scoped() as scope:
        register_action("test_reg_scoped")(note)
        assert "test_reg_scoped" in registry.action_names() and registry.current() is scope
    assert registry.action("test_reg_scoped") is None and registry.current() is DEFAULT


def test_a_rule_set_runs_what_it_was_checked_with():
    gm = fxrewrite.trace(nn.Sequential(nn.ReLU()), torch.zeros(1))
    with registry.scoped():
        register_action("test_reg_note", per_match=False)(note)
        rules = RuleSet([Rule("n", "test_reg_note", args={"text": "checked"})])
    assert registry.action("test_reg_note") is None
    assert fxrewrite.rewrite(gm, rules).log[0].notes == ["checked"]  # the scope is gone, the binding is not
    with pytest.raises(RuleFileError, match="unknown action 'test_reg_note'"):
        RuleSet([Rule("n", "test_reg_note")])


def test_a_rule_set_is_checked_against_an_explicit_registry():
    mine = Registry("mine", parent=BUILTINS)
    mine.add_action(registry.ActionSpec("test_reg_mine", note, per_match=False))
    rules = RuleSet([Rule("n", "test_reg_mine"), Rule("c", "collapse", Pattern(module_class="ReLU"))], registry=mine)
    assert rules.registry is mine and [b.action.name for b in rules.bound] == ["test_reg_mine", "collapse"]
    with pytest.raises(RuleFileError):
        RuleSet([Rule("n", "test_reg_mine")])  # not in the current registry
    result = fxrewrite.rewrite(fxrewrite.trace(nn.Sequential(nn.ReLU()), torch.zeros(1)), rules)
    assert result.log[0].notes == ["a"] and result.nodes_with_status("collapsed") == ["_0"]


def test_rule_sets_added_keep_their_bindings(scope):
    register_action("test_reg_note", per_match=False)(note)
    first = RuleSet([Rule("n", "test_reg_note")])
    with registry.scoped():
        register_action("test_reg_note", per_match=False, replace=True)(other_note)
        second = RuleSet([Rule("m", "test_reg_note")])
    both = first + second
    result = fxrewrite.rewrite(fxrewrite.trace(nn.Sequential(nn.ReLU()), torch.zeros(1)), both)
    assert [entry.notes for entry in result.log] == [["a"], ["B"]]
    with pytest.raises(RuleFileError, match="duplicate rule name"):
        first + first


def test_plug_ins_load_into_the_default_registry_even_inside_a_scope():
    with registry.scoped():
        registry.load_plugin("yolov9")
    assert registry.module_class("DDetect") is not None and registry.action("fuse_repconv") is not None
    with pytest.raises(LookupError, match="unknown plug-in 'nope'; installed plug-ins: yolov9"):
        registry.load_plugin("nope")


def test_declared_defaults_and_aliases_reach_the_action(scope):
    seen = []

    @register_action("test_reg_args", params={
        "node": registry.Param((str,), default="$root"),
        "size": registry.Param((int,), default=3),
        "colour": registry.Param((str,)),
        "color": registry.Param((str,), alias_of="colour"),
    })
    def record(ctx, match, **args):
        seen.append(args)

    gm = fxrewrite.trace(nn.Sequential(nn.ReLU()), torch.zeros(1))
    fxrewrite.rewrite(gm, [Rule("r", "test_reg_args", Pattern(module_class="ReLU"), args={"color": "red"})])
    (args,) = seen
    assert set(args) == {"node", "size", "colour"} and args["node"].name == "_0"
    assert (args["size"], args["colour"]) == (3, "red")


def test_load_rules_against_an_explicit_registry():
    mine = Registry("mine", parent=DEFAULT)
    mine.add_action(registry.ActionSpec("test_reg_file", note, per_match=False))
    text = "rules:\n  - {name: n, action: test_reg_file, args: {text: from a file}}\n"
    rules = fxrewrite.load_rules(text, registry=mine)
    assert rules.registry is mine
    result = fxrewrite.rewrite(fxrewrite.trace(nn.Sequential(nn.ReLU()), torch.zeros(1)), rules)
    assert result.log[0].notes == ["from a file"]
    with pytest.raises(RuleFileError, match="unknown action 'test_reg_file'"):
        fxrewrite.load_rules(text)
