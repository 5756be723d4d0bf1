"""Models from forks of the official YOLOv9 code: their own classes, imported from a trusted source tree.

A fork's checkpoint pickles its own classes (``models.common.CBAM``, an edited
``models.yolo.DualDDetect``) at their module paths. fxrewrite's twins of the
official classes would silently compute something else, so a fork's model is
loaded, converted and saved with the fork's classes only:

* :class:`CodeTree` is the source tree the user trusts (``--code PATH``: the
  folder that holds ``models/``). Its modules are imported under their own names
  (``models.common``, ``models.yolo``, ``utils.general`` ...) from that folder only,
  and only while :meth:`CodeTree.imported` is active: the caller's ``sys.modules``
  and ``sys.path`` are restored afterwards (the tree's modules are kept aside and put
  back on the next activation, so each file runs once).
* :meth:`CodeTree.allow_list` is what a checkpoint may name: the classes the tree
  *defines* (``nn.Module`` subclasses whose ``__module__`` is the module the pickle
  names; never a function, never a name a tree module merely imported), torch's own
  layers, and the plain data the core loader accepts. The checkpoint stays untrusted.
* :class:`ForkClasses` is how a conversion finds classes by name (a rule's
  ``replace: {with: DDetect}``, the derived config): in the modules the model's
  own classes come from.

>>> import textwrap, tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> (root / "models").mkdir()
>>> _ = (root / "models" / "common.py").write_text(textwrap.dedent('''
...     import torch
...     class Gate(torch.nn.Module):
...         def forward(self, x):
...             return x * torch.sigmoid(x)
...     def helper():
...         pass
... '''))
>>> import sys; before = sys.modules.get("models.common")
>>> tree = CodeTree(root)
>>> tree.find_class("models.common.Gate").__name__, tree.find_class("models.common.helper")
('Gate', None)
>>> sys.modules.get("models.common") is before    # imported aside: the caller's modules are untouched
True
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import os
import sys
import threading
import types
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch import nn

from ..errors import FxRewriteError
from ..registry import DEFAULT, Registry

if TYPE_CHECKING:
    from ..serialization import AllowList

__all__ = ["CodeError", "CodeTree", "ForkClasses", "as_code_tree", "fork_classes_of", "is_fork_model"]

# One import of a source tree at a time: sys.modules and sys.path are process-wide.
_IMPORT_LOCK = threading.RLock()
# Every tree imported in this process: a model loaded from one is converted with that tree's classes.
_TREES: "weakref.WeakSet[CodeTree]" = weakref.WeakSet()


class CodeError(FxRewriteError, ValueError):
    """The trusted source tree (``--code PATH``) is missing, has no ``models/``, or fails to import."""


def _top(name: str) -> str:
    return name.partition(".")[0]


# Top-level names a source tree never takes over while it is imported (a vendored copy of torch or a
# folder named like a standard module would otherwise replace the real one in sys.modules).
_NEVER_TREE = frozenset(getattr(sys, "stdlib_module_names", ())) | {
    "torch", "torchvision", "numpy", "yaml", "fxrewrite", "networkx", "graphviz", "safetensors", "onnx",
    "onnxruntime", "pytest", "_pytest", "pkg_resources", "setuptools", "pip", "typing_extensions"}


class CodeTree:
    """A fork's source tree: the folder that holds ``models/`` (``--code .`` from inside a fork)."""

    def __init__(self, root: str | os.PathLike):
        shown = os.fspath(root)
        path = Path(shown).expanduser()
        if not path.is_dir():
            raise CodeError(f"--code {shown}: not a folder (give the root of the source tree the checkpoint was "
                            "trained with: the folder that holds models/)")
        self.root = path.resolve()
        self.shown = shown
        if not (self.root / "models").is_dir():
            raise CodeError(f"--code {shown}: has no models/ folder; give the root of the source tree the "
                            "checkpoint was trained with (the folder that holds models/)")
        #: top-level names the tree provides: its packages (folders with Python files) and modules
        self.packages = frozenset(
            p.stem for p in self.root.iterdir() if p.stem.isidentifier() and p.stem not in _NEVER_TREE and (
                (p.is_dir() and any(p.glob("*.py"))) or (p.is_file() and p.suffix == ".py")))
        self._modules: dict[str, types.ModuleType] = {}  # the tree's modules while they are put aside
        self._depth = 0
        _TREES.add(self)

    @staticmethod
    def defining(cls: type) -> "CodeTree | None":
        """The tree (imported in this process) that defines ``cls``, if any."""
        for tree in list(_TREES):
            module = tree._modules.get(cls.__module__)
            if module is not None and getattr(module, cls.__qualname__, None) is cls:
                return tree
        return None

    def __repr__(self) -> str:
        return f"CodeTree({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    @contextlib.contextmanager
    def imported(self) -> Iterator["CodeTree"]:
        """The tree's modules as ``sys.modules`` entries under their own names, its root first on
        ``sys.path``, for the ``with`` block (pickling names classes through ``sys.modules``; the
        tree's code may import lazily). Whatever held those names before is put back afterwards."""
        with _IMPORT_LOCK:
            if self._depth:  # nested: already active
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            saved_path = list(sys.path)
            saved = {name: m for name, m in sys.modules.items() if _top(name) in self.packages}
            for name in saved:
                del sys.modules[name]
            sys.modules.update(self._modules)
            sys.path.insert(0, str(self.root))
            importlib.invalidate_caches()
            self._depth = 1
            try:
                yield self
            finally:
                self._depth = 0
                mine = {name: m for name, m in sys.modules.items() if _top(name) in self.packages}
                self._modules.update(mine)
                for name in mine:
                    del sys.modules[name]
                sys.modules.update(saved)
                sys.path[:] = saved_path

    def _source_file(self, module: str) -> Path | None:
        """The file of ``module`` inside the tree, or None (never looks outside it)."""
        parts = module.split(".")
        if _top(module) not in self.packages or not all(p.isidentifier() for p in parts):
            return None
        base = self.root.joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def module(self, name: str) -> types.ModuleType | None:
        """The tree's module ``name`` (imported on first use), or None when the tree has no such file."""
        if self._source_file(name) is None:
            return None
        with self.imported():
            try:
                module = importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - trusted code failing to import: say where and why
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise CodeError(f"--code {self.shown}: importing {name} failed: {type(exc).__name__}"
                                f"{': ' + first if first else ''}") from None
        origin = Path(getattr(module, "__file__", "") or "").resolve()
        if self.root not in origin.parents:  # e.g. a namespace package resolved elsewhere
            return None
        return module

    def find_class(self, dotted: str) -> type[nn.Module] | None:
        """The ``nn.Module`` class the tree *defines* at ``dotted`` (``models.common.CBAM``), else None.

        A name a tree module only imports (``models.common.torch``, ``models.yolo.Conv``
        when ``Conv`` lives in ``models.common``), a function or any other object is not a
        class of the tree: pickle always names a class by the module that defines it.
        """
        module_name, _, name = dotted.rpartition(".")
        if not module_name or not name.isidentifier():
            return None
        module = self.module(module_name)
        obj = getattr(module, name, None) if module is not None else None
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module_name \
                and obj.__qualname__ == name:
            return obj
        return None

    def owns(self, dotted: str) -> bool:
        """Whether a pickled name points into the tree (its top-level package is one of the tree's)."""
        return _top(dotted) in self.packages

    def allow_list(self, names: Iterable[str]) -> "AllowList":
        """What a checkpoint naming ``names`` may load: the tree's classes among them (never fxrewrite's
        twins of official names), torch layers, and the data the core loader accepts. Names in the tree
        that are not classes it defines stay refused."""
        from .classes import checkpoint_allow_list

        ours: dict[str, Any] = {}
        for dotted in names:
            if self.owns(dotted):
                cls = self.find_class(dotted)
                if cls is not None:
                    ours[dotted] = cls
            elif dotted.startswith("torch.nn.modules."):
                cls = _torch_layer(dotted)
                if cls is not None:
                    ours[dotted] = cls
        return checkpoint_allow_list(aliases=ours)


def _torch_layer(dotted: str) -> type[nn.Module] | None:
    """torch's own layer class at ``dotted`` (``torch.nn.modules.linear.Linear``), if it is one."""
    module_name, _, name = dotted.rpartition(".")
    module = sys.modules.get(module_name)  # torch's modules are all imported with torch; nothing new runs
    obj = getattr(module, name, None) if module is not None else None
    if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module_name:
        return obj
    return None


def as_code_tree(code: "str | os.PathLike | CodeTree") -> CodeTree:
    return code if isinstance(code, CodeTree) else CodeTree(code)


# -- classes by name, for a conversion ----------------------------------------------------------
class ForkClasses:
    """Classes by name from the modules a fork model's classes come from (its ``models.common``,
    ``models.yolo``): what a rule's ``replace: {with: DDetect}`` builds and what the derived config
    names. ``tree`` (when the model came from ``--code``) is activated while the fork's code runs."""

    def __init__(self, modules: Iterable[types.ModuleType], tree: CodeTree | None = None):
        self.modules = list(dict.fromkeys(modules))
        self.tree = tree

    def find(self, name: str) -> type[nn.Module] | None:
        for module in self.modules:
            obj = getattr(module, name, None)
            if isinstance(obj, type) and issubclass(obj, nn.Module):
                return obj
        return None

    def registry(self, parent: Registry | None = None) -> Registry:
        """A child of ``parent`` (default: the default registry) in which every class name of the
        fork's modules means the fork's class (``DDetect`` is the fork's, not fxrewrite's twin), and
        a YOLOv9 class name the fork does not define means a class that refuses to be built
        (:class:`MissingForkClass`): fxrewrite's twin would compute something else."""
        scope = Registry("fork", parent=parent or DEFAULT)
        for module in self.modules:
            for name, obj in vars(module).items():
                if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__ \
                        and scope.module_class(name) is not obj:
                    scope.add_module_class(obj, name, replace=True)
        for name in scope.module_class_names():
            cls = scope.module_class(name)
            if cls is not None and cls.__module__.startswith("fxrewrite.yolov9.") and self.find(name) is None:
                scope.add_module_class(_missing_class(name, self.modules), name, replace=True)
        return scope

    def active(self) -> contextlib.AbstractContextManager:
        """While the fork's code runs (tracing, building, pickling): its tree's modules in place."""
        return self.tree.imported() if self.tree is not None else contextlib.nullcontext()


class MissingForkClass(FxRewriteError, ValueError):
    """A rule would build a YOLOv9 class that the fork's code does not define."""

    def __init__(self, name: str, where: str):
        self.name = name
        super().__init__(f"the fork's code ({where}) defines no class {name}")


def _missing_class(name: str, modules: list[types.ModuleType]) -> type[nn.Module]:
    """A stand-in for a class the fork lacks: building it raises :class:`MissingForkClass`."""
    where = ", ".join(m.__name__ for m in modules) or "its modules"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise MissingForkClass(name, where)

    return type(name, (nn.Module,), {"__init__": __init__, "__module__": __name__})


def missing_class_in(exc: BaseException) -> MissingForkClass | None:
    """The :class:`MissingForkClass` behind an error (a rule's ``replace`` reports it as its own error)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MissingForkClass):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def fork_classes_of(model: nn.Module, tree: CodeTree | None = None) -> ForkClasses:
    """The :class:`ForkClasses` of ``model``: the modules its own (non-torch) classes are defined in,
    the head's module first (where the single-head class lives in the official layout)."""
    layers = getattr(model, "model", None)
    ordered = [type(layers[-1])] if isinstance(layers, nn.Sequential) and len(layers) else []
    ordered += [type(model)] + [type(m) for m in model.modules()]
    tree = tree or CodeTree.defining(type(model))  # loaded with load_checkpoint(code=...): that tree
    modules = []
    for cls in ordered:
        if cls.__module__.startswith("torch."):
            continue
        module = (tree.module(cls.__module__) if tree is not None else None) or sys.modules.get(cls.__module__)
        if module is not None:
            modules.append(module)
    return ForkClasses(modules, tree)


def is_fork_model(model: nn.Module) -> bool:
    """Whether ``model`` was built by other code than fxrewrite's (a fork's, or the official code): its
    model class is not fxrewrite's. It is then converted with its own classes. (An fxrewrite model with
    a few user blocks added by ``register_block`` is fxrewrite's.)"""
    return not type(model).__module__.startswith("fxrewrite.")


# -- the converted model, in the fork's classes -----------------------------------------------
def assemble(source: nn.Module, config: dict, layers: list[nn.Module]) -> nn.Module:
    """A model of the source's own class around ``layers``: nothing is built or initialised.

    The source's plain attributes (``names``, ``nc``, ``hyp``, ``inplace`` ...) are kept;
    ``yaml`` becomes ``config``, ``save`` is recomputed from the layers' ``f``, and
    ``stride`` is the new head's.
    """
    from .planner import save_indices

    cls = type(source)
    model = cls.__new__(cls)
    nn.Module.__init__(model)
    for key, value in vars(source).items():
        if not key.startswith("_") and key not in ("training", "yaml", "save"):
            setattr(model, key, copy.deepcopy(value) if not isinstance(value, torch.Tensor) else value)
    model.yaml = copy.deepcopy(config)
    model.model = nn.Sequential(*layers)
    model.save = save_indices([layer.f for layer in layers])
    stride = getattr(layers[-1], "stride", None)
    if isinstance(stride, torch.Tensor):
        model.stride = stride
    return model


#: Plain settings compared between a converted layer and the layer its config line builds.
_SETTINGS = (bool, int, float, str, tuple, type(None))


def build_from_config(source: nn.Module, config: dict, classes: ForkClasses) -> nn.Module:
    """The source's class built from ``config`` by the fork's own builder (its ``__init__``)."""
    cls = type(source)
    ch = config.get("ch", 3)
    with classes.active():
        try:
            with torch.device("meta"):
                return cls(copy.deepcopy(config), ch=ch)
        except Exception:  # noqa: BLE001 - some forks' builders cannot run on meta: build for real
            pass
        try:
            return cls(copy.deepcopy(config), ch=ch)
        except Exception as exc:  # noqa: BLE001
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise FxRewriteError(f"{cls.__module__}.{cls.__qualname__}(derived config) failed: "
                                 f"{type(exc).__name__}{': ' + first if first else ''}") from None


def setting_differences(actual: nn.Module, expected: nn.Module) -> list[str]:
    """Plain settings (BatchNorm ``eps``, ``momentum``, strides ...) in which the modules of ``actual``
    differ from the same-named modules of ``expected``: what a config cannot say."""
    built = dict(expected.named_modules())
    found = []
    for name, module in actual.named_modules():
        other = built.get(name)
        if other is None or type(other) is not type(module):
            continue
        for key, value in vars(module).items():
            if key.startswith("_") or key in ("training", "np", "i", "f", "type", "stride", "anchors", "strides",
                                               "shape") or not isinstance(value, _SETTINGS):
                continue
            theirs = vars(other).get(key, value)
            if isinstance(theirs, _SETTINGS) and theirs != value:
                found.append(f"{name}.{key} is {value!r}, the config builds {theirs!r}")
    return found
