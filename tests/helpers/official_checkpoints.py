"""Checkpoints written by the official YOLOv9 code itself, the way ``train_dual.py`` saves them.

The independent oracle for everything that reads checkpoints: the model is an official
``models.yolo.DetectionModel`` / ``SegmentationModel`` built by the official code, trained
for one made-up step with the official optimizer and EMA helpers, and saved with plain
``torch.save`` (official pickling, official class names), with every entry
``train_dual.py`` writes mid-training::

    {'epoch', 'best_fitness', 'model': deepcopy(model).half(), 'ema': deepcopy(ema.ema).half(),
     'updates', 'optimizer': optimizer.state_dict(), 'opt': vars(opt), 'git', 'date'}

with the attributes ``train_dual.py`` attaches to the model (``nc``, ``hyp``,
``class_weights``, ``names`` as a dict) and copies to the EMA (``update_attr``).

:func:`write_training_checkpoint` also records what the official code computes for the
EMA weights as stored (fp16, evaluated in fp32): the main output on a fixed image, the
reference every conversion of the file is compared with, bitwise.
"""
from __future__ import annotations

import argparse
import ast
import copy
import logging
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from helpers.official import official

# Where each official training head puts its main prediction in its eval output, and where
# the converted single head puts it: facts of the official heads (models/yolo.py).
MAIN_OUTPUT = {"DualDDetect": lambda y: y[0][1], "DualDetect": lambda y: y[0][1],
               "TripleDDetect": lambda y: y[0], "DualDSegment": lambda y: y[0]}
#: The main branch's mask prototypes (DualDSegment eval: (pred, (maps, coefficients, protos)) of the main branch).
MAIN_PROTOS = {"DualDSegment": lambda y: y[1][2]}

#: Training checkpoints the official code writes for the tests: name -> (official config, nc). Full width,
#: as trained; ``/8`` ones keep the layer graph at an eighth of the channels (``official().small_cfg``).
OFFICIAL_CHECKPOINTS = {
    "yolov9-t": ("yolov9-t.yaml", 80),
    "yolov9-s": ("yolov9-s.yaml", 80),
    "yolov9-m": ("yolov9-m.yaml", 80),
    "yolov9-c": ("yolov9-c.yaml", 80),
    "yolov9-e": ("yolov9-e.yaml", 80),
    "yolov9-c-dseg": ("yolov9-c-dseg.yaml", 80),
    "yolov9-cf/8": ("yolov9-cf.yaml", 7),  # TripleDDetect, as the official config ships it
    # No official config has a DualDetect head: yolov9-c with one, and an nn.Identity as its first layer
    # (where yolov9-c has its Silence), so that collapse-identity runs on an official model too.
    "dual-detect/8": ("yolov9-c.yaml", 5),
}


def official_config(name: str) -> str | dict:
    """The config of one of :data:`OFFICIAL_CHECKPOINTS`: a file name, or a dict for the variants."""
    off = official()
    file, _ = OFFICIAL_CHECKPOINTS[name]
    if not name.endswith("/8"):
        return file
    cfg = off.small_cfg(file)
    if name.startswith("dual-detect"):
        assert cfg["backbone"][0][2] == "Silence" and cfg["head"][-1][2] == "DualDDetect"
        cfg["backbone"][0][2] = "nn.Identity"
        cfg["head"][-1][2] = "DualDetect"
    return cfg


#: The image every test of a checkpoint evaluates it on: small (the oracle runs full-width models),
#: not square (catches height/width mix-ups), seeded.
IMAGE_SIZE = (64, 96)


@dataclass
class OfficialCheckpoint:
    """A checkpoint file the official code wrote, and what the official code computes from it."""

    path: Path
    config: str  # the official config it was built from
    head: str  # class name of the training head
    names: dict  # as train_dual.py stores them
    params: int  # the official training model's parameter count
    image: torch.Tensor
    expected: torch.Tensor  # the official EMA model's (as stored) main prediction on ``image``
    expected_protos: torch.Tensor | None  # segmentation: the main branch's mask prototypes
    model_differs: bool  # the stored 'model' predicts differently from the 'ema' (so using 'ema' is checked)


def image() -> torch.Tensor:
    return torch.rand(1, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(1234))


def coco_names() -> dict:
    import yaml

    with open(official().root / "data" / "coco.yaml", encoding="utf-8") as f:
        names = yaml.safe_load(f)["names"]
    return dict(enumerate(names)) if isinstance(names, list) else dict(names)


def train_dual_opt(cfg: str, hyp: dict) -> dict:
    """``vars(opt)`` as ``train_dual.py`` saves it: the defaults of its own argument parser (its
    ``parse_opt``, taken from the file and run), after ``main`` resolved the paths and ``train``
    stored the hyperparameters."""
    root = official().root
    tree = ast.parse((root / "train_dual.py").read_text(encoding="utf-8"))
    parse_opt = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "parse_opt")
    namespace = {"argparse": argparse, "ROOT": root}
    exec(compile(ast.Module([parse_opt], type_ignores=[]), str(root / "train_dual.py"), "exec"), namespace)
    argv, sys.argv = sys.argv, ["train_dual.py"]
    try:
        opt = vars(namespace["parse_opt"](True))
    finally:
        sys.argv = argv
    opt.update(cfg=cfg, data=str(root / "data" / "coco.yaml"), hyp=dict(hyp), weights=str(opt["weights"]),
               project=str(opt["project"]), save_dir=str(Path(opt["project"]) / "exp"))
    return opt


def _randomise_batchnorm(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Trained-looking BatchNorms: weight, bias, running mean and variance away from their init values."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                shape = m.running_mean.shape
                m.weight.copy_(torch.rand(shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(shape, generator=gen) + 0.5)


def write_training_checkpoint(path: Path, config: str | dict, *, label: str, seed: int = 0,
                              nc: int = 80) -> OfficialCheckpoint:
    """Build ``config`` with the official code, train it one made-up step and save it as ``train_dual.py``."""
    off = official()
    torch_utils, general = sys.modules["utils.torch_utils"], sys.modules["utils.general"]
    level = general.LOGGER.level
    general.LOGGER.setLevel(logging.WARNING)  # the official model summary and optimizer report: not test output
    try:
        return _write(path, config, label, seed, nc, off, torch_utils, general)
    finally:
        general.LOGGER.setLevel(level)


def _write(path, config, label, seed, nc, off, torch_utils, general) -> OfficialCheckpoint:
    torch.manual_seed(seed)
    model = off.build(config, nc=nc)  # training mode, as train_dual.py builds it
    gen = torch.Generator().manual_seed(seed)
    _randomise_batchnorm(model, gen)
    with open(off.root / "data" / "hyps" / "hyp.scratch-high.yaml", encoding="utf-8") as f:
        import yaml

        hyp = yaml.safe_load(f)
    hyp["anchor_t"] = 5.0  # what train() adds before saving opt.hyp
    names = coco_names() if nc == 80 else {i: f"class{i}" for i in range(nc)}
    labels = [np.array([[i % nc, 0.5, 0.5, 0.1, 0.1] for i in range(3 * nc)], dtype=np.float32)]
    model.nc, model.hyp, model.names = nc, hyp, names
    model.class_weights = general.labels_to_class_weights(labels, nc) * nc
    optimizer = torch_utils.smart_optimizer(model, "SGD", hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
    ema = torch_utils.ModelEMA(model, updates=1000)  # mid-training: the EMA lags the model
    # One optimisation step on a made-up gradient: real momentum buffers in the optimizer state, and
    # the EMA, the model and the initial weights all differ.
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 0.1
    optimizer.step()
    with torch.no_grad():
        for m in model.modules():  # what the training forward passes did to the running statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.mul_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    ema.update(model)
    ema.update_attr(model, include=["yaml", "nc", "hyp", "names", "stride", "class_weights"])
    ckpt = {
        "epoch": 3,
        "best_fitness": np.array([0.4321]),  # fitness() returns an array; train_dual.py keeps it as it is
        "model": copy.deepcopy(model).half(),
        "ema": copy.deepcopy(ema.ema).half(),
        "updates": ema.updates,
        "optimizer": optimizer.state_dict(),
        "opt": train_dual_opt(label, hyp),
        "git": None,  # GIT_INFO is None in the official train_dual.py
        "date": datetime(2024, 2, 21, 12, 0).isoformat(),
    }
    torch.save(ckpt, path)
    head = type(model.model[-1]).__name__
    x = image()
    with torch.no_grad():  # the reference: the weights as stored, evaluated in fp32 by the official code
        reference = copy.deepcopy(ckpt["ema"]).float().eval()
        out = reference(x)
        expected = MAIN_OUTPUT[head](out)
        protos = MAIN_PROTOS[head](out) if head in MAIN_PROTOS else None
        other = MAIN_OUTPUT[head](copy.deepcopy(ckpt["model"]).float().eval()(x))
    params = sum(p.numel() for p in model.parameters())
    return OfficialCheckpoint(path, label, head, names, params, x, expected, protos, not torch.equal(other, expected))
