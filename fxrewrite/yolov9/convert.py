"""Convert a YOLOv9 training model (auxiliary PGI branch) into its GELAN inference model.

Why this module is long: the conversion and the derivation of its config are checked against
each other (the derived config must build the converted layers), step by step below.

The pipeline, with no layer index written anywhere:

1. :func:`fxrewrite.trace` at layer granularity: one node per ``model.N`` layer,
   the head as one node, shapes propagated on a small example image;
2. :func:`fxrewrite.rewrite` with ``rules/yolov9.yaml``: the dual/triple head
   becomes a single head on its main inputs, everything the output does not need
   is pruned, pass-through ``Silence`` layers are collapsed;
3. the kept layers are renumbered in graph order and a config is derived from
   the graph: every ``from`` is rewritten from the node's actual inputs;
4. the converted model is assembled from the rewritten graph's layers, cloned
   (:func:`fxrewrite.clone_module`: new module objects, the same tensors; nothing
   is built or initialised); each tensor's origin comes from the rewrite's
   provenance, and the derived config is checked to describe the result
   (:meth:`Conversion.check_config` compares every tensor with a model built
   from the config on the ``meta`` device).

>>> import torch
>>> from fxrewrite.yolov9 import DetectionModel, convert
>>> torch.manual_seed(0) and None
>>> training = DetectionModel("yolov9-t").eval()
>>> conversion = convert(training)
>>> len(conversion.model.model), conversion.layer_map[22]
(23, 29)
>>> x = torch.rand(1, 3, 64, 96)
>>> torch.equal(conversion.model(x)[0], training(x)[0][1])
True
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..gcpause import gc_paused
from .. import trace as fx_trace
from ..engine import RewriteResult, rewrite
from ..errors import FxRewriteError, RebindError
from ..pattern import input_nodes
from ..rebind import clone_module
from ..rule_file import load_rules, shipped_rules_dir
from ..rules import RuleSet
from ..shapes import ShapePropagationError, shape_tree
from ..tensors import named_tensors, parameter_count
from ..verify import VerifyReport, verify
from .config import ConfigError
from .inputs import (example_input, example_size as default_example_size, fixed_flags, input_channels,
                     restore_modes, set_eval)

# Where the main prediction sits in each training head's eval output, and in the
# single head's (the converted model's) output. Facts of the official heads.
MAIN_OUTPUT = {
    "DualDDetect": (0, 1),  # eval: ([aux, main], [aux maps, main maps])
    "DualDetect": (0, 1),
    "TripleDDetect": (0,),  # eval: (last branch's prediction, its maps)
    "DualDSegment": (0,),  # eval: (main boxes + mask coefficients, (...))
}
SINGLE_OUTPUT = (0,)
# Model-level attributes of the official DetectionModel that the converted model keeps.
KEPT_ATTRIBUTES = ("names", "nc", "hyp", "class_weights", "args", "inplace")


class ConversionError(FxRewriteError, ValueError):
    """The model cannot be converted (nothing to do, not a layered YOLO model, ...)."""


@dataclass
class Conversion:
    """A converted model and everything about how it was obtained."""

    model: nn.Module  # the GELAN model; its tensors are the training model's
    config: dict  # the derived config (also ``model.yaml``)
    layer_map: dict[int, int]  # new layer index -> training-model layer index
    param_map: dict[str, str]  # new tensor name -> training-model tensor name
    result: RewriteResult  # the graph rewrite (log, node status, drawings)
    source: nn.Module  # the training model
    head: str  # class name of the training model's head
    pruned: list[int] = field(default_factory=list)
    collapsed: list[int] = field(default_factory=list)
    #: a fork's own classes (:mod:`fxrewrite.yolov9.fork`) when the model was converted with them, else None
    classes: Any = None

    @property
    def params_before(self) -> int:
        return sum(p.numel() for p in self.source.parameters())

    @property
    def params_after(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def check_config(self) -> list[str]:
        """Build the derived config on the ``meta`` device (no memory) and check that it makes exactly
        the converted model's tensors, names and shapes; raise :class:`ConversionError` naming the
        first that differs. (:func:`convert` checks layer channels and replaced layers only.)

        A fork's model is built by the fork's own class from the derived config; the plain settings
        a config cannot say (a BatchNorm's ``eps`` changed by the fork's initialisation code) are
        returned where they differ from what the config builds (the converted model keeps its own)."""
        if self.classes is not None:
            from .fork import build_from_config, setting_differences

            try:
                skeleton = build_from_config(self.source, self.config, self.classes)
            except FxRewriteError as exc:
                raise ConversionError(f"the derived config cannot be built by the fork's code: {exc}") from None
            _compare_tensors(self.model, skeleton, "", "the derived config does not describe the converted model: ")
            return setting_differences(self.model, skeleton)
        try:
            skeleton = _build(self.source, self.config, self.model.model[-1])
        except (ConfigError, TypeError, ValueError) as exc:
            raise ConversionError(f"the derived config cannot be built: {exc}") from None
        _compare_tensors(self.model, skeleton, "", "the derived config does not describe the converted model: ")
        return []

    def verify(self, inputs: torch.Tensor) -> VerifyReport:
        """Compare the converted model's output with the training model's main output on ``inputs``."""
        modes = set_eval(self.source), set_eval(self.model)
        try:
            with self.classes.active() if self.classes is not None else contextlib.nullcontext():
                return verify(self.source, self.model, inputs, select_original=main_output(self.source, inputs),
                              select_rewritten=SINGLE_OUTPUT)
        finally:
            restore_modes(self.source, modes[0])
            restore_modes(self.model, modes[1])


def default_rules() -> RuleSet:
    """The shipped ``rules/yolov9.yaml`` (compiled once per process while the file is unchanged)."""
    stat = (shipped_rules_dir() / "yolov9.yaml").stat()
    compiled = _compiled_shipped_rules("yolov9", stat.st_mtime_ns, stat.st_size)
    return RuleSet(list(compiled.rules), compiled.max_iterations, compiled.source, compiled.plugins)


@functools.lru_cache(maxsize=4)
def _compiled_shipped_rules(name: str, mtime_ns: int, size: int) -> RuleSet:
    return load_rules(name)


@gc_paused  # one pause for the whole conversion (trace, rewrite, assembly): see fxrewrite.gcpause
def convert(model: nn.Module, rules: RuleSet | None = None, *, example_size: int | None = None,
            classes: Any = None) -> Conversion:
    """Convert a layered YOLO model (official classes or fxrewrite's) with ``rules`` (default: yolov9.yaml).

    The input model is not modified (its train/eval mode is restored); the
    converted model shares its tensors.

    A model of a fork's own classes (its model class is not fxrewrite's: loaded with
    ``load_checkpoint(path, code=PATH)`` or built by the fork's code in memory) is
    converted with its own classes (``classes``, default
    :func:`fxrewrite.yolov9.fork.fork_classes_of`): the rules' ``replace`` builds the
    fork's class of that name (the fork's ``DDetect``), the converted model is of the
    fork's classes, and the derived config keeps every line the rules did not
    replace verbatim (``from`` renumbered).
    """
    from .fork import fork_classes_of, is_fork_model

    layers = _layers(model)
    head = type(layers[-1]).__name__
    if classes is None and is_fork_model(model):
        classes = fork_classes_of(model)
    if classes is None:
        return _convert(model, rules, example_size, None, head, layers)
    from ..errors import RewriteError
    from .fork import missing_class_in

    with classes.active():
        try:
            return _convert(model, _fork_rules(rules, classes), example_size, classes, head, layers)
        except RewriteError as exc:
            missing = missing_class_in(exc)
            if missing is None:
                raise
            raise ConversionError(
                f"rule '{exc.rule}' replaces the {head} head with a {missing.name}, but {missing}; fxrewrite's own "
                f"{missing.name} would compute something else. Write a rule that replaces {head} with the fork's "
                "single-branch head (cookbook: rules/examples/fork-renamed-head.yaml) and pass it with "
                "--rules FILE yolov9") from None


def _fork_rules(rules: RuleSet | None, classes: Any) -> RuleSet:
    """``rules`` checked again with the fork's classes: every class name a rule builds is the fork's."""
    base = rules if rules is not None else default_rules()
    return RuleSet(base.rules, base.max_iterations, base.source, base.plugins, registry=classes.registry(base.registry))


def _convert(model: nn.Module, rules: RuleSet | None, example_size: int | None, classes: Any, head: str,
             layers: nn.Sequential) -> Conversion:
    try:
        result = trace_and_rewrite(model, rules, example_size=example_size)
    except ShapePropagationError as exc:  # the model does not run: say which tensor is wrong when we can
        if classes is None:
            check_against_config(model)
        raise ConversionError(f"the model does not run on a test image: {exc}") from exc
    gm = result.original
    kept = [n for n in result.module.graph.nodes if n.op == "call_module"]
    old_index = {n: _layer_index(n, result.module) for n in kept}
    if [old_index[n] for n in kept] == list(range(len(layers))) and not _replaced(result):
        if classes is not None:
            raise ConversionError(
                f"nothing to convert: no rule replaced the model's head ({head}) and no layer is unreachable; "
                f"if {head} is a training head with an auxiliary branch, write a rule that replaces it with the "
                "fork's single-branch head (cookbook: rules/examples/fork-renamed-head.yaml) and pass it with "
                "--rules yolov9 FILE")
        raise ConversionError(f"nothing to convert: the model ({head} head) has no auxiliary layers "
                              f"for the rules to remove; it is already an inference model")
    config = derive_config(model.yaml, kept, old_index, result, classes=classes)
    converted, param_map = _assemble(model, config, kept, result, classes)
    if classes is None:
        _check_config_describes(model, config, kept, converted, result)
        _copy_model_attributes(model, converted)
    set_eval(converted)  # the new containers (and a layer a rule built in training mode)
    status = result.node_status
    index_of_name = {n.name: _layer_index_by_target(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    return Conversion(
        model=converted, config=config, layer_map={k: old_index[n] for k, n in enumerate(kept)},
        param_map=param_map, result=result, source=model, head=head,
        pruned=sorted(i for name, i in index_of_name.items() if status.get(name) == "pruned"),
        collapsed=sorted(i for name, i in index_of_name.items() if status.get(name) == "collapsed"),
        classes=classes)


def main_output(model: nn.Module, inputs: Any = None) -> tuple[int, ...]:
    """Where the main prediction sits in the eval output of ``model`` (a training model).

    By its head's class, or the class it derives from (:data:`MAIN_OUTPUT`); for a head
    of another name, from the output's structure, as the official heads lay it out: when
    the first element is a list of predictions (one per branch), the last is the main
    branch's; otherwise the first element is the prediction.
    """
    head = model.model[-1] if isinstance(getattr(model, "model", None), nn.Sequential) else model
    for cls in type(head).__mro__:
        if cls.__name__ in MAIN_OUTPUT:
            return MAIN_OUTPUT[cls.__name__]
    if inputs is None:
        return SINGLE_OUTPUT
    with torch.no_grad():
        out = model(inputs)
    first = out[0] if isinstance(out, (list, tuple)) and out else out
    if isinstance(first, (list, tuple)) and first and all(isinstance(t, torch.Tensor) for t in first):
        return (0, len(first) - 1)
    return SINGLE_OUTPUT


def trace_and_rewrite(model: nn.Module, rules: RuleSet | None = None, *, ops: bool = False,
                      example_size: int | None = None) -> RewriteResult:
    """Trace ``model`` in eval mode (one node per layer, or per operation with ``ops``) and rewrite it.

    The model's train/eval mode is restored afterwards. At op granularity the
    result is for looking at (drawings); :func:`convert` needs layer granularity.
    """
    from .model import runs_layer_loop

    _layers(model)
    rules = rules if rules is not None else default_rules()
    modes = set_eval(model)
    try:
        reference = next((t for t in model.parameters() if t.is_floating_point()), torch.zeros(()))
        size = example_size or default_example_size(model)
        # Same dtype and device as the weights: fp16 checkpoints and meta-device skeletons trace too.
        example = example_input(model, size, dtype=reference.dtype, device=reference.device)
        # Only shapes are kept (verification runs the models itself): convolutions are not computed,
        # which was two thirds of a conversion (fp16 arithmetic on a CPU).
        gm = fx_trace(model, example, max_depth=None if ops else 2, concrete_args=fixed_flags(model),
                      shapes_only=True, sealed_leaves=runs_layer_loop(model))
        return rewrite(gm, rules)
    finally:
        restore_modes(model, modes)


def check_against_config(model: nn.Module) -> None:
    """Raise a :class:`ConversionError` naming the first tensor of ``model`` whose shape contradicts
    ``model.yaml`` (a corrupt or hand-edited checkpoint: the config says 64 channels, the weight has 32).

    The config is built on the ``meta`` device (no memory is allocated); tensors the config does not
    know (a fused model's biases) are not compared.
    """
    try:
        skeleton = _build(model, copy.deepcopy(model.yaml))
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConversionError(f"the model's config (yaml) cannot be built: {exc}") from None
    expected = {name: tuple(t.shape) for name, t in named_tensors(skeleton)}
    for name, tensor in named_tensors(model):
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise ConversionError(f"the weights contradict the model's config (yaml): {name} has shape "
                                  f"{tuple(tensor.shape)}, the config makes it {expected[name]}")


# -- config derivation ----------------------------------------------------------
def derive_config(original: dict, kept: list[fx.Node], old_index: dict[fx.Node, int], result: RewriteResult,
                  *, classes: Any = None) -> dict:
    """The layered config of the rewritten graph: kept layers renumbered in graph order, every
    ``from`` recomputed from the node's inputs (``-1`` kept where the original said ``-1`` and the
    input is still the previous layer), the module name of replaced layers updated (with a fork's
    ``classes``: the fork's class name, which its own builder resolves)."""
    old_layers = list(original["backbone"]) + list(original["head"])
    n_backbone = len(original["backbone"])
    new_index = {n: k for k, n in enumerate(kept)}
    backbone, head = [], []
    for k, node in enumerate(kept):
        old = old_index[node]
        f_old, number, module, args = old_layers[old]
        replaced = result.node_status.get(node.name) == "replaced"
        inputs = []
        for inp in input_nodes(node):
            if inp.op == "placeholder":
                if k != 0:
                    raise ConversionError(f"layer {old} (new {k}) reads the raw input but is not the first layer; "
                                          f"a layered config cannot express that (keep a Silence layer as anchor)")
                inputs.append(-1)
            elif inp in new_index:
                inputs.append(new_index[inp])
            else:
                raise ConversionError(f"layer {old} reads {inp.name}, which is not a layer")
        old_from = f_old if isinstance(f_old, list) else [f_old]
        new_from = []
        for pos, j in enumerate(inputs):
            relative = old_from[pos] if not replaced and pos < len(old_from) and old_from[pos] < 0 else None
            # a relative `from` (-1, -2 ...) stays relative where it still points at the same input
            new_from.append(-1 if j == -1 else relative if relative is not None and j == k + relative else j)
        if replaced and classes is not None and not type(result.module.get_submodule(node.target)).__module__.startswith(
                "torch.nn."):  # the fork's builder names its classes by class name
            module = type(result.module.get_submodule(node.target)).__name__
        elif replaced:  # a rule built this layer: its config line names the new class (and, for torch.nn, its settings)
            module, args = _replaced_layer_entry(result.module.get_submodule(node.target), args, old, original)
        entry = [new_from if isinstance(f_old, list) or len(new_from) != 1 else new_from[0], number, module,
                 copy.deepcopy(args)]
        (backbone if old < n_backbone else head).append(entry)
    config = {k: copy.deepcopy(v) for k, v in original.items() if k not in ("backbone", "head")}
    config["backbone"], config["head"] = backbone, head
    return config


def _replaced_layer_entry(layer: nn.Module, old_args: list, old: int, config: dict) -> tuple[str, list]:
    """``module`` and ``args`` of the config line of a layer a rule built.

    ``module`` is the name the config builder knows the class by (``nn.Upsample`` for
    torch's own classes, as the official configs spell them). A YOLO block or head keeps
    the replaced line's ``args`` (``[nc]``: the builder adds the channels); a torch.nn
    layer's ``args`` are its constructor arguments, read back from the module (torch.nn
    modules keep each constructor argument as the attribute of the same name) in the form
    the builder's role for the class expects, so the config rebuilds its settings too
    (``mode: bilinear``, not the replaced layer's). :func:`_check_config_describes` then
    checks that the line builds exactly this layer.
    """
    from . import catalogue

    cls = type(layer)
    names = catalogue.names_of(cls)
    if not names:
        raise ConversionError(f"layer {old} became a {cls.__qualname__}, which the config builder does not know: "
                              f"register it with fxrewrite.yolov9.register_block")
    name = min(names, key=lambda n: (n.startswith("torch."), len(n)))  # nn.Upsample before torch.nn.Upsample
    if not cls.__module__.startswith("torch.nn."):
        return name, copy.deepcopy(old_args)
    role = catalogue.block(name).role
    if role == "batchnorm":  # the builder passes the input channels itself
        return name, []
    args = _constructor_args(layer, old)
    if role == "scaled":  # [c_out, ...]: the builder adds c_in and scales c_out by width_multiple
        return name, [_unscaled_channels(layer.out_channels, config.get("width_multiple", 1.0), old), *args[2:]]
    return name, args


def _constructor_args(layer: nn.Module, old: int) -> list:
    """The positional constructor arguments that rebuild a torch.nn ``layer`` (trailing defaults left out)."""
    import inspect

    def plain(value):  # YAML has lists, not tuples
        return [plain(v) for v in value] if isinstance(value, (tuple, list)) else value

    args, defaults = [], []
    for param in list(inspect.signature(type(layer).__init__).parameters.values())[1:]:
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD) or param.name in ("device", "dtype"):
            break
        if hasattr(layer, param.name):
            value = getattr(layer, param.name)
            if isinstance(param.default, bool) and (value is None or isinstance(value, torch.Tensor)):
                value = value is not None  # a flag whose attribute is the tensor it creates (bias=True)
        elif param.default is not param.empty:
            value = param.default
        else:
            raise ConversionError(f"layer {old}: {type(layer).__name__} keeps no attribute {param.name!r}; its "
                                  f"config line cannot be derived")
        args.append(plain(value))
        defaults.append(plain(param.default))

    def is_default(value, default) -> bool:  # torch stores kernel_size=3 as (3, 3)
        return value == default or (isinstance(value, list) and bool(value) and all(v == default for v in value))

    while args and defaults[-1] is not inspect.Parameter.empty and is_default(args[-1], defaults[-1]):
        args.pop()
        defaults.pop()
    return args


def _unscaled_channels(channels: int, width: float, old: int) -> int:
    """The channel count a config line must give for the builder's width scaling to make ``channels``."""
    from .planner import make_divisible

    guess = max(1, round(channels / width))
    for value in (guess, guess - 1, guess + 1):
        if value >= 1 and make_divisible(value * width, 8) == channels:
            return value
    raise ConversionError(f"layer {old}: {channels} output channels cannot be written in a config with width_multiple "
                          f"{width} (the builder makes multiples of 8)")


# -- helpers ------------------------------------------------------------------------
def _layers(model: nn.Module) -> nn.Sequential:
    layers = getattr(model, "model", None)
    if not isinstance(layers, nn.Sequential) or not hasattr(model, "yaml") or not len(layers):
        raise ConversionError(f"{type(model).__name__} is not a layered YOLO model (needs .model layers and .yaml)")
    return layers


def _layer_index(node: fx.Node, gm: fx.GraphModule) -> int:
    module = gm.get_submodule(node.target)
    return int(getattr(module, "i", _layer_index_by_target(node.target)))


def _layer_index_by_target(target: str) -> int:
    return int(target.rsplit(".", 1)[-1])


def _replaced(result: RewriteResult) -> bool:
    return bool(result.nodes_with_status("replaced"))


def _build(model: nn.Module, config: dict, head: nn.Module | None = None) -> nn.Module:
    from .model import model_class_for

    cls = model_class_for(type(model.model[-1]))
    strides = _head_strides(head) or [float(s) for s in torch.as_tensor(model.stride).tolist()]
    with torch.device("meta"):
        return cls(config, ch=input_channels(model), strides=strides)


def _head_strides(head: nn.Module | None) -> list[float] | None:
    """The rewritten head's strides, when it has one per level: a rule may have rebuilt the head
    on fewer levels than the training model's (``rules/examples/drop-p5.yaml``)."""
    stride = getattr(head, "stride", None)
    if not isinstance(stride, torch.Tensor) or stride.is_meta or stride.numel() != getattr(head, "nl", -1) \
            or not bool((stride > 0).all()):
        return None
    return [float(s) for s in stride.tolist()]


def _assemble(model: nn.Module, config: dict, kept: list[fx.Node],
              result: RewriteResult, classes: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """The converted model: the rewritten graph's layers, renumbered, as a model of the source's kind.

    Each layer is a structural clone of the rewritten module (new module objects, the same
    tensors: nothing is built, allocated or initialised), in fxrewrite's classes (a layer of
    the official code becomes its registered twin). Returns the model and new tensor name
    -> origin in the training model, from the rewrite's provenance.
    """
    from .model import model_class_for
    from .planner import activations_in_place

    entries = list(config["backbone"]) + list(config["head"])
    from .catalogue import official_aliases

    twins = official_aliases()  # official class path -> fxrewrite's class of the same layout

    def fxrewrite_class(cls: type) -> type:
        return twins.get(f"{cls.__module__}.{cls.__qualname__}", cls)

    layers, param_map = [], {}
    for k, node in enumerate(kept):
        layer = clone_module(result.module.get_submodule(node.target),
                             class_for=None if classes is not None else fxrewrite_class)
        layer.i, layer.f = k, copy.deepcopy(entries[k][0])
        if not isinstance(getattr(layer, "type", None), str):  # a module a rule built has no label yet
            layer.type = f"{type(layer).__module__}.{type(layer).__qualname__}"
        layer.np = parameter_count(layer)
        if result.node_status.get(node.name) == "replaced":
            # A rule built this layer; built from its config line it would have in-place activations
            # (the reference builder's setting; BatchNorm settings came from the replaced layer).
            activations_in_place(layer)
        for name, _ in named_tensors(layer):
            origin = result.param_map.get(f"{node.target}.{name}")
            if origin is None:
                raise RebindError(f"model.{k}.{name}: no origin recorded for this tensor")
            param_map[f"model.{k}.{name}"] = origin
        layers.append(layer)
    if classes is not None:
        from .fork import assemble

        return assemble(model, config, layers), param_map
    return model_class_for(type(model.model[-1])).from_layers(config, layers), param_map


def _check_config_describes(model: nn.Module, config: dict, kept: list[fx.Node], converted: nn.Module,
                            result: RewriteResult) -> None:
    """Check, without building a model, that ``config`` describes ``converted``.

    Every layer's output channels (from shape propagation) must be what the config's channel
    bookkeeping gives, and each layer a rule replaced must hold exactly the tensors its config
    line builds (that one layer is built on the ``meta`` device, unless the rule built it with the
    very constructor call its config line makes: see :func:`_makes_the_same_call`). Kept layers are the training
    model's own modules on their own config lines: a mismatch there means the training model's
    weights contradict its config, reported by :func:`check_against_config` naming the tensor.
    :meth:`Conversion.check_config` compares every tensor (``--verify``).
    """
    from .planner import initialize_weights, plan_layers

    try:
        plans = plan_layers(copy.deepcopy(config), input_channels(model), None)
    except ConfigError as exc:
        raise ConversionError(f"the derived config cannot be built: {exc}") from None
    for k, (plan, node) in enumerate(zip(plans, kept)):
        produced = _output_channels(node)
        if plan.out_channels is not None and produced is not None and produced != plan.out_channels:
            check_against_config(model)
            raise ConversionError(f"the derived config does not describe the converted model: layer {k} "
                                  f"({plan.name}) outputs {produced} channels, the config makes it "
                                  f"{plan.out_channels}")
        if result.node_status.get(node.name) == "replaced":
            layer = converted.model[k]
            if not type(layer).__module__.startswith("torch.nn.") \
                    and _makes_the_same_call(plan, result.constructions.get(node.name)):
                continue  # the rule built it with the call its config line makes: the same tensors
            with torch.device("meta"):
                built = plan.instantiate()
            initialize_weights(built)  # the builder's settings: BatchNorm eps and momentum, in-place activations
            _compare_tensors(layer, built, f"model.{k}.", "the derived config does not describe the converted model: ")
            if type(layer).__module__.startswith("torch.nn.") and layer.extra_repr() != built.extra_repr():
                line = (list(config["backbone"]) + list(config["head"]))[k]
                raise ConversionError(f"the derived config cannot describe the converted model: layer {k} is "
                                      f"{type(layer).__name__}({layer.extra_repr()}), but its config line "
                                      f"({line[2]}, args {line[3]}) builds {type(built).__name__}({built.extra_repr()})")


def _makes_the_same_call(plan: Any, built: Any) -> bool:
    """Whether the config line's ``plan`` builds its layer with exactly the constructor call a rule
    built it with (``built``: a :class:`fxrewrite.context.Construction`), argument by argument
    after defaults: then it holds the same tensors, and building it again to compare (a
    detection head: a few milliseconds) can be skipped. Anything else (another class, other
    values, a repeated block, arguments that do not bind or compare) says no."""
    if built is None or built.cls is not plan.cls or (plan.stack and plan.repeats > 1):
        return False
    try:
        signature = inspect.signature(plan.cls)
        config_call, rule_call = signature.bind(*plan.args), signature.bind(**built.kwargs)
        config_call.apply_defaults()
        rule_call.apply_defaults()
        return bool(config_call.arguments == rule_call.arguments)
    except Exception:  # (a tensor argument compares element by element: not a yes)
        return False


def _output_channels(node: fx.Node) -> int | list[int] | None:
    shapes = shape_tree(node)
    if isinstance(shapes, tuple) and len(shapes) == 4 and all(isinstance(d, int) for d in shapes):
        return shapes[1]
    if isinstance(shapes, (list, tuple)) and shapes and all(isinstance(s, tuple) and len(s) == 4 for s in shapes):
        return [s[1] for s in shapes]  # CBLinear: its routed outputs
    return None


def _compare_tensors(actual: nn.Module, expected: nn.Module, prefix: str, problem: str) -> None:
    """Raise a ConversionError naming the first tensor whose name or shape differs."""
    want = {name: tuple(t.shape) for name, t in named_tensors(expected)}
    have = {name: tuple(t.shape) for name, t in named_tensors(actual)}
    for name in [*want, *(n for n in have if n not in want)]:
        if want.get(name) != have.get(name):
            raise ConversionError(
                f"{problem}{prefix}{name} " + (f"has shape {have[name]}" if name in have else "is missing")
                + ", the config " + (f"makes it {want[name]}" if name in want else "has no such tensor"))


def _copy_model_attributes(source: nn.Module, converted: nn.Module) -> None:
    for attr in KEPT_ATTRIBUTES:
        if attr in vars(source):
            setattr(converted, attr, copy.deepcopy(getattr(source, attr)))
