"""The official ``tools/reparameterization.ipynb`` method as one script: the baseline users run today.

``python benchmarks/notebook_method.py IN.pt OUT.pt --variant e`` does what the notebook's
"Convert YOLOv9-E" cells do, with the official code importable (the ``yolo9`` test oracle,
``tests/helpers/official.py``, standing in for a checkout of WongKinYiu/yolov9):

1. build ``gelan-X.yaml`` with the official ``Model`` (``ch=3, nc=80, anchors=3``), eval mode;
2. ``torch.load`` the training checkpoint with the C unpickler (``weights_only=False``: the
   notebook predates torch's safe default and needs the official classes);
3. copy every tensor of ``ckpt['model']`` into the new model through the notebook's hard-coded
   layer-index map (yolov9-c: backbone/neck ``i -> i + 1``, head ``22 <- 38`` with ``cv2 <- cv4``,
   ``cv3 <- cv5``, ``dfl <- dfl2``; yolov9-e: ``0..28`` unchanged, ``29..41 <- 36..48``,
   ``42 <- 49``), in place, as the notebook's ``-=``/``+=`` do;
4. ``torch.save`` ``{'model': model.half(), 'optimizer': None, ...}``.

One deliberate difference makes the baseline *stronger* than the notebook: the notebook calls
``state_dict()`` of both models again for every key (four walks of the whole model per tensor,
quadratic in the model size); here each model's ``state_dict()`` is taken once. The copy is the
same. The script prints a JSON line with the time of each stage (``import``, ``build``, ``load``,
``copy``, ``save``) so a benchmark can compare stages as well as whole processes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Where the notebook's map sends each kept layer, per variant: gelan layer -> training layer, and
# the head's gelan index with its training index (cv2/cv3/dfl read from cv4/cv5/dfl2).
LAYER_MAPS = {
    "c": {"layers": lambda i: i + 1, "last": 21, "head": (22, 38)},
    "m": {"layers": lambda i: i + 1, "last": 21, "head": (22, 38)},
    "s": {"layers": lambda i: i, "last": 21, "head": (22, 29)},
    "e": {"layers": lambda i: i if i < 29 else i + 7, "last": 41, "head": (42, 49)},
}
HEAD_RENAMES = {"cv2": "cv4", "cv3": "cv5", "dfl": "dfl2"}


def training_key(key: str, variant: str) -> str:
    """The training-model tensor the notebook copies into gelan tensor ``key``."""
    plan = LAYER_MAPS[variant]
    _, index, rest = key.split(".", 2)
    index = int(index)
    if index <= plan["last"]:
        return f"model.{plan['layers'](index)}.{rest}"
    head_new, head_old = plan["head"]
    if index != head_new:
        raise KeyError(f"{key}: no layer {index} in the notebook's map for yolov9-{variant}")
    first, _, tail = rest.partition(".")
    return f"model.{head_old}.{HEAD_RENAMES.get(first, first)}.{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--variant", choices=sorted(LAYER_MAPS), required=True)
    args = parser.parse_args(argv)
    times: dict[str, float] = {}
    start = time.perf_counter()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the helpers package
    import torch
    from helpers.official import official

    off = official()
    times["import"] = time.perf_counter() - start

    mark = time.perf_counter()
    model = off.yolo.Model(str(off.cfg(f"gelan-{args.variant}.yaml")), ch=3, nc=80, anchors=3)
    model = model.to(torch.device("cpu"))
    model.eval()
    times["build"] = time.perf_counter() - mark

    mark = time.perf_counter()
    ckpt = torch.load(args.input, map_location="cpu", weights_only=False)
    times["load"] = time.perf_counter() - mark

    mark = time.perf_counter()
    model.names, model.nc = ckpt["model"].names, ckpt["model"].nc
    source = ckpt["model"].state_dict()
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            tensor -= tensor  # the notebook's in-place copy: zero, then add the trained value
            tensor += source[training_key(key, args.variant)]
    model.eval()
    times["copy"] = time.perf_counter() - mark

    mark = time.perf_counter()
    converted = {"model": model.half(), "optimizer": None, "best_fitness": None, "ema": None, "updates": None,
                 "opt": None, "git": None, "date": None, "epoch": -1}
    torch.save(converted, args.output)
    times["save"] = time.perf_counter() - mark
    times["total"] = time.perf_counter() - start
    print(json.dumps(times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
