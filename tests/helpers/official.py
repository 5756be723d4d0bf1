"""Test oracle: the REAL official YOLOv9 code, importable as ``models.common`` / ``models.yolo``.

Usage (for test authors)
------------------------
tests/ has no ``__init__.py``, so pytest (default "prepend" import mode) puts
``tests/yolov9`` on ``sys.path`` and a test module there imports this file as ``official``:

    from helpers.official import official, official_available, requires_official

    pytestmark = requires_official          # without the wheel: fail, saying how to install it
    off = official()                        # cached; returns a SimpleNamespace
    off.common.Conv, off.yolo.DetectionModel  # the official classes
    model = off.build("yolov9-c.yaml")      # official DetectionModel, nc=80 (fp32, CPU)
    off.cfg("gelan-c.yaml")                 # Path to the wheel's yaml (detect/ or segment/)
    off.cfg_dict("yolov9-c.yaml")           # the yaml parsed into a fresh dict
    off.small_cfg("yolov9-c.yaml")          # same layer graph, channels / 8 (~2M params at nc=80, fast)
    off.build(off.small_cfg("yolov9-c.yaml"))  # build also accepts a config dict
    off.root                                # Path of the installed wheel's yolo9/ folder

Importing takes ~2.5 s (once per process). Building yolov9-c takes a few seconds on
this CPU; prefer ``small_cfg`` / small inputs in fast tests. Side effect: the dotted
names ``models.*`` and ``utils.*`` (and ``yolo9``) belong to the official files for the
rest of the process (``utils.tal.anchor_generator`` imports ``utils.general`` by that
bare name). The bare top-level ``models``/``utils`` also point at the official packages,
*unless* another module already held that name when ``official()`` ran (a test helper
``models.py`` on ``sys.path``): that one gets its name back, and the official
modules stay reachable through their dotted entries, which is all pickle needs.

After ``official()`` the modules are registered in ``sys.modules`` under exactly the
names a real checkout uses (``models``, ``models.common``, ``models.yolo``,
``models.experimental``, ``utils``, ``utils.general`` ...), so ``pickle``/``torch.save``
of an official model writes ``models.yolo.DetectionModel``, ``models.common.Conv``
... exactly like a ``train_dual.py`` checkpoint, and ``torch.load(weights_only=False)``
of such a file resolves back to these classes. ``cls.__module__`` is ``models.common``
or ``models.yolo`` (the files are executed under those names, nothing is renamed).

Where it comes from
-------------------
The PyPI wheel ``yolo9==1.0.18`` (a repackaging of WongKinYiu/yolov9 whose imports
read ``from yolo9.models.common import ...``). We do NOT run ``yolo9/__init__.py``
(it needs OpenCV and builds an inference wrapper). Instead a small meta-path finder
makes ``yolo9.models*`` / ``yolo9.utils*`` aliases of the top-level ``models*`` /
``utils*`` modules, so each official file is executed exactly once, under its
official top-level name. ``import yolo9`` then yields a bare package object (no
wrapper class) -- nothing in this project needs the wrapper.

Third-party modules the official import chain needs but we do not install (they
are heavy or, for torchvision, ABI-incompatible with our torch): ``cv2``,
``torchvision``, ``pandas``, ``matplotlib``, ``seaborn`` and ``IPython``. Each one that is NOT
importable for real is replaced by a permissive placeholder module *only while the
official files are being imported*; the placeholders are removed from
``sys.modules`` afterwards, so later ``import cv2`` elsewhere still fails
honestly. Model building, forward, ``fuse()`` and pickling never touch them.
``thop`` is optional in the official code (guarded by try/except) and not stubbed.
Global state the official import mutates (warning filters, torch/numpy print
options, OMP/NUMEXPR env vars, ``sys.path``) is restored afterwards.

pip packages the oracle needs (CI):
    pip install --no-deps yolo9==1.0.18
    pip install numpy packaging PyYAML requests pillow tqdm psutil
(torch is already installed. All of these are imported at module level by the
official ``models.common`` / ``utils.*`` files: ``requests`` by common and
``utils.downloads``, ``pillow``/``tqdm``/``psutil`` by ``utils.dataloaders``,
``packaging`` by ``utils.general``. All are small pure/abi3 wheels.)
"""
from __future__ import annotations

import copy
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
import warnings
from pathlib import Path

import pytest

WHEEL_SPEC = "yolo9==1.0.18"

# Heavy optional third-party modules -> submodules the official code imports from them.
_HEAVY = {
    "cv2": (),
    "torchvision": ("transforms", "transforms.functional", "ops", "datasets"),
    "pandas": (),
    "matplotlib": ("pyplot",),
    "seaborn": (),
    "IPython": ("display",),  # only `display` is imported; stubbed when IPython is absent
}

# The official modules we expose; importing models.common first matters: it pulls in
# export -> experimental -> yolo while common is still half-initialised, which is the
# order the wheel itself is written for (yolo.py re-reads common's namespace lazily).
_ENTRY = ("models.common", "models.yolo", "models.experimental")


class _Placeholder:
    """Stand-in for any attribute of a missing heavy module.

    Module-level code in the official utils does things like ``cv2.setNumThreads(0)``,
    ``pd.options.display.max_columns = 10`` or subclasses
    ``torchvision.datasets.ImageFolder``; a placeholder absorbs all of that.
    """

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Placeholder(f"{self._name}.{item}")

    def __call__(self, *args, **kwargs):
        return _Placeholder(f"{self._name}()")

    def __iter__(self):
        return iter(())

    def __mro_entries__(self, bases):  # allows `class X(stub.Something): ...`
        return (object,)

    def __repr__(self):
        return f"<placeholder {self._name}>"


class _StubModule(types.ModuleType):
    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Placeholder(f"{self.__name__}.{item}")


def _importable(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        importlib.import_module(name)
    except Exception:  # ImportError, or a broken install (torchvision vs our torch)
        # A failed import can leave half-built submodules behind; drop them.
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            sys.modules.pop(key, None)
        return False
    return True


_ABSENT = object()


def _install_stubs() -> dict[str, object]:
    """Insert placeholders for the missing heavy modules; return what they replaced."""
    replaced: dict[str, object] = {}
    for top, subs in _HEAVY.items():
        if _importable(top):
            continue
        for name in (top, *(f"{top}.{s}" for s in subs)):
            mod = _StubModule(name)
            mod.__path__ = []  # a package, so `import top.sub` is accepted
            mod.__version__ = "0.0.0"  # official version checks compare strings
            replaced[name] = sys.modules.get(name, _ABSENT)  # e.g. a None "blocked" marker
            sys.modules[name] = mod
        for sub in subs:  # wire attributes so `top.sub.x` works as well as `from top.sub import x`
            parent, _, leaf = f"{top}.{sub}".rpartition(".")
            setattr(sys.modules[parent], leaf, sys.modules[f"{top}.{sub}"])
    return replaced


def _remove_stubs(replaced: dict[str, object]) -> None:
    for name, previous in replaced.items():
        if previous is _ABSENT:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous


class _AliasLoader(importlib.abc.Loader):
    """Loader for ``yolo9.models*``/``yolo9.utils*``: hands back the top-level module."""

    def __init__(self, target: str):
        self.target = target
        self._original_spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        # importlib overwrites __spec__ on whatever we return; remember the real one.
        self._original_spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._original_spec  # keep the module's real (top-level) identity


class _BarePackageLoader(importlib.abc.Loader):
    """Loader for ``yolo9`` itself: a package object whose ``__init__`` is never run."""

    def create_module(self, spec):
        return None  # default module creation

    def exec_module(self, module):
        pass


class _Yolo9Finder(importlib.abc.MetaPathFinder):
    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "yolo9":
            spec = importlib.machinery.ModuleSpec("yolo9", _BarePackageLoader(), is_package=True)
            spec.submodule_search_locations = [str(self.root)]  # yolo9.export etc. load normally
            return spec
        for top in ("models", "utils"):
            prefix = f"yolo9.{top}"
            if fullname == prefix or fullname.startswith(prefix + "."):
                target = fullname[len("yolo9."):]
                return importlib.machinery.ModuleSpec(fullname, _AliasLoader(target))
        return None


def _wheel_root() -> Path | None:
    spec = importlib.machinery.PathFinder.find_spec("yolo9")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    return root if (root / "models" / "common.py").is_file() else None


def _is_official(module, root: Path, name: str) -> bool:
    return [str(p) for p in getattr(module, "__path__", [])] == [str(root / name)]


def _claim_top_package(name: str, root: Path):
    """Put the wheel's ``models``/``utils`` package under its bare name (like a repo checkout).

    Returns the foreign module that held the name before (e.g. a test-helper
    ``models.py``), or None. The caller gives the name back to it once the
    official files are imported: from then on they are reached through their
    own dotted entries (``sys.modules["models.common"]``), which is all that
    pickle, ``torch.load`` and ``import models.common`` look up -- pickle only
    needs *some* importable top-level ``models`` beside it.
    """
    existing = sys.modules.get(name)
    if existing is not None and _is_official(existing, root, name):
        return None
    clashes = [k for k in sys.modules if k.startswith(name + ".") and not
               str(getattr(sys.modules[k], "__file__", "") or "").startswith(str(root / name))]
    if clashes:
        raise RuntimeError(
            f"official(): {', '.join(sorted(clashes))} already imported from elsewhere; "
            f"the official YOLOv9 code needs the {name}.* names for itself"
        )
    spec = importlib.util.spec_from_file_location(
        name, root / name / "__init__.py", submodule_search_locations=[str(root / name)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return existing


class _GlobalState:
    """Snapshot/restore of process state the official import changes as a side effect."""

    _ENV = ("OMP_NUM_THREADS", "NUMEXPR_MAX_THREADS")

    def __enter__(self):
        import numpy as np
        import torch

        self.filters = list(warnings.filters)
        self.path = list(sys.path)
        self.env = {k: os.environ.get(k) for k in self._ENV}
        self.np_opts = np.get_printoptions()
        self.torch_opts = copy.copy(torch._tensor_str.PRINT_OPTS.__dict__)
        return self

    def __exit__(self, *exc):
        import numpy as np
        import torch

        warnings.filters[:] = self.filters
        warnings._filters_mutated()
        sys.path[:] = self.path
        for k, v in self.env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        np.set_printoptions(**self.np_opts)
        torch._tensor_str.PRINT_OPTS.__dict__.update(self.torch_opts)
        return False


def official_available() -> bool:
    """True when the yolo9 wheel is installed (the oracle can be built)."""
    return _wheel_root() is not None


INSTALL_HINT = (f"the official YOLOv9 code (the tests' oracle, the yolo9 wheel) is not installed: run "
                f"`bash scripts/setup.sh`, or `pip install --no-deps {WHEEL_SPEC}` and "
                f"`pip install numpy packaging requests pillow tqdm psutil`")

#: Marks a test that compares with the official code. Without the oracle such a test FAILS with
#: INSTALL_HINT (the setup hook of tests/yolov9/conftest.py): it is never skipped, because a suite
#: that silently skips its oracle passes without checking what it claims to.
requires_official = pytest.mark.requires_official


@functools.lru_cache(maxsize=None)
def official() -> types.SimpleNamespace:
    """Import the official code once; return a namespace with the modules and helpers."""
    root = _wheel_root()
    if root is None:
        raise RuntimeError(INSTALL_HINT)

    with _GlobalState():
        finder = _Yolo9Finder(root)
        sys.meta_path.insert(0, finder)
        stubs = _install_stubs()
        foreign = {}
        try:
            for top in ("utils", "models"):
                foreign[top] = _claim_top_package(top, root)
            modules = {name: importlib.import_module(name) for name in _ENTRY}
        finally:
            _remove_stubs(stubs)
            for top, previous in foreign.items():
                if previous is not None:  # e.g. a test helper models.py: hand its name back
                    sys.modules[top] = previous
            # The finder stays installed: lazy `import yolo9.models.common` inside official
            # functions must keep resolving to the same module objects.

    common, yolo = modules["models.common"], modules["models.yolo"]
    assert common.Conv.__module__ == "models.common", common.Conv.__module__
    assert yolo.DetectionModel.__module__ == "models.yolo", yolo.DetectionModel.__module__

    def cfg(name: str) -> Path:
        for sub in ("detect", "segment"):
            path = root / "models" / sub / name
            if path.is_file():
                return path
        raise FileNotFoundError(f"no official config {name!r} under {root / 'models'}")

    def cfg_dict(name: str) -> dict:
        import yaml

        with open(cfg(name), encoding="ascii", errors="ignore") as f:
            return yaml.safe_load(f)

    def small_cfg(name: str, divisor: int = 8) -> dict:
        """The config with every channel count (an int arg >= 64) divided by ``divisor``.

        Keeps the exact layer graph (Silence, CBLinear/CBFuse, Dual heads ...) at a
        fraction of the cost, e.g. yolov9-c shrinks from 51M to ~2.1M parameters (nc=80).
        Width scaling can't do this: the reference does not scale CBLinear outputs.
        """
        def shrink(value):
            if isinstance(value, list):
                return [shrink(v) for v in value]
            if isinstance(value, int) and not isinstance(value, bool) and value >= 64:
                return value // divisor
            return value

        d = cfg_dict(name)
        for part in ("backbone", "head"):
            d[part] = [[f, n, m, shrink(args)] for f, n, m, args in d[part]]
        return d

    def build(name: str | dict, nc: int | None = None, ch: int = 3):
        import torch

        """Official model from a config name or dict; DetectionModel or SegmentationModel by head."""
        d = copy.deepcopy(name) if isinstance(name, dict) else cfg_dict(name)
        head = str(d["head"][-1][2])
        cls = yolo.SegmentationModel if "Segment" in head else yolo.DetectionModel
        with torch.no_grad():  # the constructor's stride-probing forward needs no autograd graph
            return cls(d, ch=ch, nc=nc)

    return types.SimpleNamespace(
        root=root,
        common=common,
        yolo=yolo,
        experimental=modules["models.experimental"],
        cfg=cfg,
        cfg_dict=cfg_dict,
        small_cfg=small_cfg,
        build=build,
    )
