"""Cookbook rule files (``rules/examples/`` in the repository), each tested by ``tests/test_cookbook.py``.

Load one by name: ``fxrewrite.load_rules("examples/drop-p5")``.

* ``drop-p5.yaml`` / ``drop-p3.yaml``: drop a detection scale of a GELAN / converted YOLOv9 model;
* ``silu-to-relu.yaml``: replace every SiLU with a ReLU;
* ``backbone-features.yaml``: cut a model after its backbone (a feature extractor);
* ``drop-noops.yaml``: remove dropouts (any class matching a glob) and identities;
* ``swish-to-silu.yaml`` + ``swish_to_silu.py``: a rule whose action is Python, registered by name;
* ``rejected-by-check.yaml``: a rule whose check rejects matches, with the reasons in the log.
"""
