"""A YOLOv9 training checkpoint written the way the official ``train_dual.py`` writes one (for benchmarks).

The model is built by the official code (the ``yolo9`` oracle of ``tests/helpers/official.py``),
so the file names ``models.yolo.DetectionModel``, ``models.common.*`` exactly like a real
``last.pt``, and plain ``torch.load(weights_only=False)`` resolves them to the official
classes, as the reparameterization notebook does. Contents, as train_dual.py saves them
mid-training: ``epoch``, ``best_fitness``, ``model`` and ``ema`` (fp16 deep copies), ``updates``,
``optimizer`` (its state dict: three parameter groups, SGD with Nesterov momentum, one step
taken so every parameter has its momentum buffer), ``opt`` (the options dict), ``git``, ``date``.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the helpers package
from helpers.official import official  # noqa: E402


def write_training_checkpoint(path: Path, cfg: str = "yolov9-e.yaml", seed: int = 0) -> Path:
    off = official()
    torch.manual_seed(seed)
    model = off.build(cfg)
    ema = copy.deepcopy(model).eval()
    names = {i: f"class{i}" for i in range(80)}
    for m in (model, ema):  # what train_dual attaches (ModelEMA.update_attr copies it to the EMA)
        m.nc, m.names, m.hyp = 80, names, {"lr0": 0.01, "momentum": 0.937, "box": 7.5, "cls": 0.5, "dfl": 1.5}
    groups = [], [], []  # train_dual's smart_optimizer: biases, BatchNorm weights (no decay), other weights
    norms = tuple(v for k, v in nn.__dict__.items() if "Norm" in k)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias":
                groups[2].append(p)
            elif name == "weight" and isinstance(module, norms):
                groups[1].append(p)
            else:
                groups[0].append(p)
    optimizer = torch.optim.SGD(groups[2], lr=0.01, momentum=0.937, nesterov=True)
    optimizer.add_param_group({"params": groups[0], "weight_decay": 5e-4})
    optimizer.add_param_group({"params": groups[1], "weight_decay": 0.0})
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    checkpoint = {
        "epoch": 10, "best_fitness": 0.25, "model": copy.deepcopy(model).half(), "ema": copy.deepcopy(ema).half(),
        "updates": 1000, "optimizer": optimizer.state_dict(),
        "opt": {"weights": "", "cfg": f"models/detect/{cfg}", "hyp": "hyp.scratch-high.yaml", "epochs": 500,
                "batch_size": 16, "imgsz": 640, "optimizer": "SGD", "save_dir": "runs/train/exp"},
        "git": {"remote": "https://github.com/WongKinYiu/yolov9", "branch": "main", "commit": "5b1ea9a"},
        "date": "2024-03-01T12:00:00",
    }
    torch.save(checkpoint, path)
    return path
