"""The built-in actions, one module each; importing this package registers them in
:data:`fxrewrite.registry.BUILTINS` (``fxrewrite/__init__.py`` does, once).

* ``prune_unreachable``: keep only what the selected outputs need;
* ``collapse``: a pass-through node is replaced by one of its inputs;
* ``replace``: the matched module becomes another class, on a subset of its inputs;
* ``remove``: delete the matched node (and, with ``cascade``, whatever uses it);
* ``fuse_conv_bn`` / ``fold_batchnorm``: fold a BatchNorm into the convolution before it
  (inside a block / between two graph nodes).

Each is written against :class:`fxrewrite.context.RewriteContext` alone; a new
built-in action is a new module here, added to the import below.
"""
from . import collapse, fuse, prune, remove, replace  # noqa: F401  (registration)
