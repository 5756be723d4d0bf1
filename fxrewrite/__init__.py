"""fxrewrite: declarative graph rewriting over torch.fx, with provenance.

Trace a model, rewrite its graph with rules (YAML or Python), re-bind the
result's parameters to the originals by provenance, verify, and draw. This module
is the composition root: it imports the layers (docs/architecture.md) and registers
the built-in actions and checks; no other core module imports it.

>>> import torch, fxrewrite
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Identity())
>>> gm = fxrewrite.trace(model, torch.zeros(1, 4))
>>> rules = fxrewrite.load_rules('''
... rules:
...   - {name: no-identity, pattern: {module_class: Identity}, action: collapse}
... ''')
>>> result = fxrewrite.rewrite(gm, rules)
>>> fxrewrite.verify(model, result.module, torch.randn(2, 4)).equal
True
"""
from .errors import FxRewriteError, RebindError, RewriteError, RuleFileError, RuleProblem, VerifyError
from .tracing import LeafPolicy, TraceReport, trace
from .shapes import propagate_shapes, shape_of
from .pattern import Count, Match, Pattern
from .rules import Check, Rule, RuleSet
from .registry import Param, RegistrationError, register_action, register_check, register_module_class
from .context import RewriteContext
from .result import RewriteResult, RuleLog
from .engine import rewrite
from . import actions as _actions, checks as _checks  # noqa: F401  (the built-ins, registered in registry.BUILTINS)
from .rule_file import load_rules
from .rebind import Rebound, bind_tensors, clone_module, rebind
from .verify import VerifyReport, verify
from .nxgraph import to_networkx

__version__ = "0.1.0"

__all__ = [
    "trace", "LeafPolicy", "TraceReport", "propagate_shapes", "shape_of",
    "Pattern", "Count", "Match", "Rule", "Check", "RuleSet", "load_rules",
    "register_action", "register_check", "register_module_class", "Param",
    "rewrite", "RewriteResult", "RewriteContext", "RuleLog",
    "rebind", "bind_tensors", "clone_module", "Rebound", "verify", "VerifyReport", "to_networkx",
    "FxRewriteError", "RuleFileError", "RuleProblem", "RewriteError", "RebindError", "VerifyError",
    "RegistrationError",
]
