"""The safe loader against torch's own loaders, file by file.

1. Damaged archives, generated from a train_dual-style checkpoint (truncated, flipped bytes, compressed
   records, duplicated names, wrong sizes, short records): fxrewrite either loads exactly what plain
   ``torch.load(weights_only=True, mmap=False)`` loads -- and what was written -- or refuses with a
   message naming the file; it never returns other tensors. (torch itself takes many of them silently.)
2. Valid and hostile files against torch's ``weights_only`` loader given the same allow-list
   (``safe_globals``): everything torch refuses, fxrewrite refuses; everything both load is equal.
   (fxrewrite refuses more: constructor calls, stride-0 views, method overrides, gadgets through getattr.)
"""
from __future__ import annotations

import collections
import copy
import random
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn


from fxrewrite.serialization import LoadError, load  # noqa: E402
from fxrewrite.yolov9 import DetectionModel  # noqa: E402
from fxrewrite.yolov9.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from fxrewrite.yolov9.classes import allowed_globals, checkpoint_allow_list, official_aliases  # noqa: E402

from helpers.hostile import (MINI, EvilModule, assert_same, binunicode, handcrafted_payloads,  # noqa: E402
                             in_checkpoint, nested_ordered_dicts, op_global, op_int, op_tuple, read_records,
                             reduce_payloads, torch_zip_with_pickle, write_records)
from helpers.official import official, requires_official  # noqa: E402

REFUSED = object()
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on hand-written protocol-4 files


def torch_weights_only(path: Path):
    """torch's own safe loader, given the same names fxrewrite allows (as the real objects)."""
    pairs = [(cls, name) for name, cls in official_aliases().items()]
    pairs += [(obj, name) for name, obj in allowed_globals().items()]
    try:
        with torch.serialization.safe_globals(pairs):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception:  # noqa: BLE001 - any refusal or failure counts as "torch refuses"
        return REFUSED


def ours(path: Path, mmap: bool = False):
    try:
        return load(path, checkpoint_allow_list(), mmap=mmap)
    except LoadError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        return REFUSED


# ---------------------------------------------------------------------------- 1. damaged archives
@pytest.fixture(scope="module")
def train_dual_file(tmp_path_factory) -> Path:
    """A training checkpoint as train_dual.py writes one: fp16 model and ema, optimizer state, opt, numpy."""
    torch.manual_seed(0)
    model = DetectionModel(copy.deepcopy(MINI))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    model.names = {0: "cat", 1: "dog"}
    path = tmp_path_factory.mktemp("diff") / "last.pt"
    return save_checkpoint(model, path, optimizer=optimizer.state_dict(), updates=7, opt={"epochs": 3},
                           best_fitness=np.array([0.25]))


def damaged_archives(base: Path, folder: Path) -> dict[str, Path]:
    """The corpus: each entry a damaged copy of ``base``."""
    raw = base.read_bytes()
    records = read_records(base)
    names = list(records)
    tensors = [n for n in names if "/data/" in n]
    pickle_name = next(n for n in names if n.endswith("/data.pkl"))
    rng = random.Random(11)
    corpus: dict[str, Path] = {}

    def put(label: str, data: bytes) -> None:
        path = folder / f"{len(corpus):03d}.pt"
        path.write_bytes(data)
        corpus[label] = path

    def rebuilt(label: str, items, compress=None) -> None:
        path = folder / f"{len(corpus):03d}.pt"
        write_records(path, items, compress)
        corpus[label] = path

    for k in range(1, 16):
        put(f"truncated at {k}/16", raw[: len(raw) * k // 16])
    put("truncated by one byte", raw[:-1])
    with zipfile.ZipFile(base) as z:
        infos = z.infolist()
    central = raw.index(b"PK\x01\x02")
    for position in sorted(rng.sample(range(len(raw)), 60)) + [central + 16, central + 20, central + 24]:
        flipped = bytearray(raw)
        flipped[position] ^= 1 << rng.randrange(8)
        put(f"bit flipped at byte {position}", bytes(flipped))
    for info in infos[:4] + [i for i in infos if "/data/" in i.filename][:3]:
        for field, delta in ((26, 1), (28, 3)):  # local name length, extra length
            shifted = bytearray(raw)
            struct.pack_into("<H", shifted, info.header_offset + field,
                             struct.unpack_from("<H", raw, info.header_offset + field)[0] + delta)
            put(f"{info.filename}: local header field {field} + {delta}", bytes(shifted))
    rebuilt("data.pkl deflated", records, {pickle_name: zipfile.ZIP_DEFLATED})
    rebuilt("a tensor record deflated", records, {tensors[2]: zipfile.ZIP_DEFLATED})
    rebuilt("every record deflated", records, {n: zipfile.ZIP_DEFLATED for n in names})
    rebuilt("a tensor record in bzip2", records, {tensors[1]: zipfile.ZIP_BZIP2})
    rebuilt("a tensor record in lzma", records, {tensors[1]: zipfile.ZIP_LZMA})
    rebuilt("data.pkl twice", list(records.items()) + [(pickle_name, records[pickle_name][:-2] + b"N.")])
    rebuilt("a tensor record twice", list(records.items()) + [(tensors[0], bytes(len(records[tensors[0]])))])
    rebuilt("a second data.pkl elsewhere", {**records, "other/data.pkl": records[pickle_name]})
    for name in tensors[:3]:
        rebuilt(f"{name} 4 bytes short", {**records, name: records[name][:-4]})
        rebuilt(f"{name} 4 bytes long", {**records, name: records[name] + b"\0\0\0\0"})
        rebuilt(f"{name} missing", {n: d for n, d in records.items() if n != name})
    for info in infos[:3] + [i for i in infos if "/data/" in i.filename][:2]:
        entry = raw.index(info.filename.encode(), central) - 46  # this record's directory entry
        for field, delta in ((20, 1), (24, 1), (24, -1), (42, 2)):  # compressed size, size, local header offset
            changed = bytearray(raw)
            struct.pack_into("<I", changed, entry + field, (struct.unpack_from("<I", raw, entry + field)[0] + delta)
                             % 2**32)
            put(f"{info.filename}: directory field {field} {delta:+d}", bytes(changed))
    return corpus


def test_the_corpus_is_varied(train_dual_file, tmp_path):
    corpus = damaged_archives(train_dual_file, tmp_path)
    assert len(corpus) > 120
    outcomes = collections.Counter((torch_weights_only(p) is REFUSED, ours(p) is REFUSED) for p in corpus.values())
    # torch takes damaged files that fxrewrite refuses, both refuse others, both take some (deflated records,
    # damage in unused fields) -- and no file is taken by fxrewrite but refused by torch
    assert outcomes[(False, True)] > 20 and outcomes[(True, True)] > 20 and outcomes[(False, False)] >= 5
    assert outcomes[(True, False)] == 0


@pytest.mark.parametrize("mmap", [False, True])
def test_damaged_archives_load_exactly_or_are_refused(train_dual_file, tmp_path, mmap):
    written = ours(train_dual_file)
    assert written is not REFUSED
    for label, path in damaged_archives(train_dual_file, tmp_path).items():
        got = ours(path, mmap)
        if got is REFUSED:
            with pytest.raises(CheckpointError):  # the user's entry point refuses it too, with a CheckpointError
                load_checkpoint(path, mmap=mmap)
            continue
        theirs = torch_weights_only(path)
        assert theirs is not REFUSED, label
        assert_same(got, theirs, label)
        assert_same(got, written, label)  # and it is what was written, not merely what torch reads


# ---------------------------------------------------------------------------- 2. valid and hostile files
class Rebuild:
    def __init__(self, storage, size, stride, offset=0):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class Call:
    """Pickles as ``function(*args)``."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    return DetectionModel(copy.deepcopy(MINI)).eval()


def valid_files(folder: Path, mini) -> dict[str, Path]:
    found = {"saved by fxrewrite": save_checkpoint(mini, folder / "ours.pt")}
    fused = copy.deepcopy(mini).fuse()
    found["a fused model"] = save_checkpoint(fused, folder / "fused.pt")
    return found


def official_files(folder: Path) -> dict[str, Path]:
    """Written by the official code (the oracle), as train_dual.py and a fused / segmentation model would be."""
    off = official()
    torch.manual_seed(2)
    model = off.build(off.small_cfg("yolov9-c.yaml"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    found = {}
    path = folder / "official-train.pt"
    torch.save({"model": copy.deepcopy(model).half(), "ema": copy.deepcopy(model).half(), "updates": 3,
                "optimizer": optimizer.state_dict(), "epoch": 1, "best_fitness": np.array([0.5]),
                "opt": {"cfg": "yolov9-c.yaml"}}, path)
    found["official train_dual layout"] = path
    path = folder / "official-fused.pt"
    with torch.no_grad():  # the official fuse() computes the fused weights with autograd otherwise
        fused = copy.deepcopy(model).eval().fuse().half()
    torch.save({"model": fused, "ema": None}, path)
    found["official fused"] = path
    seg = off.build(off.small_cfg("yolov9-c-dseg.yaml"))
    path = folder / "official-seg.pt"
    torch.save({"model": seg.half(), "ema": None}, path)
    found["official segmentation"] = path
    return found


def hostile_files(folder: Path, mini) -> dict[str, Path]:
    marker = folder / "PWNED"
    found: dict[str, Path] = {}
    for name, (data, _) in handcrafted_payloads(marker).items():
        found[f"handcrafted {name}"] = torch_zip_with_pickle(folder / f"h{len(found)}.pt", data)
    for name, (payload, _) in reduce_payloads().items():
        path = folder / f"r{len(found)}.pt"
        torch.save({"model": None, "epoch": payload(marker)}, path)
        found[f"reduce {name}"] = path
    evil = copy.deepcopy(mini)
    evil.model[1].extra = EvilModule(marker)
    path = folder / "evil-layer.pt"
    torch.save({"model": evil}, path)
    found["payload inside a layer"] = path
    # small arguments: torch's loader does call the constructor (with 16384, 16384, 3 it would fill 9.6 GB)
    conv = op_global("models.common.Conv") + op_tuple(op_int(16), op_int(16), op_int(3)) + b"R"
    found["a constructor call"] = torch_zip_with_pickle(folder / "call.pt", in_checkpoint(conv))
    storage = torch.zeros(2**10)._typed_storage()
    found["stride-0 view"] = save_checkpoint(mini, folder / "stride0.pt", anchors=Rebuild(storage, (2**31,), (0,)))
    found["view past its storage"] = save_checkpoint(mini, folder / "past.pt", anchors=Rebuild(storage, (2**10,), (1,), 5))
    getattr_payloads = {
        "getattr OrderedDict.__init__": Call(getattr, collections.OrderedDict, "__init__"),
        "getattr register_forward_hook": Call(getattr, nn.Conv2d(1, 1, 1), "register_forward_hook"),
        "calling forward_fuse while loading": Call(mini.model[1].forward_fuse, torch.zeros(1, 3, 8, 8)),
    }
    for name, payload in getattr_payloads.items():
        path = folder / f"g{len(found)}.pt"
        torch.save({"model": mini, "x": payload}, path)
        found[name] = path
    override = copy.deepcopy(mini)
    override.model[2].forward = override.model[1].forward_fuse
    found["forward bound to another layer"] = save_checkpoint(override, folder / "override.pt")
    found["100,000 nested dicts"] = torch_zip_with_pickle(folder / "deep.pt", in_checkpoint(nested_ordered_dicts(100_000)))
    found["models.common.os.system"] = torch_zip_with_pickle(
        folder / "gadget.pt", in_checkpoint(op_global("models.common.os.system") + op_tuple(binunicode("true")) + b"R"))
    found["BUILD on a layer class"] = torch_zip_with_pickle(
        folder / "build.pt", in_checkpoint(op_global("models.common.Conv") + b"N}" + binunicode("forward")
                                           + op_global("builtins.print") + b"s\x86b"))
    found["an unknown block"] = torch_zip_with_pickle(folder / "unknown.pt",
                                                      in_checkpoint(op_global("models.common.MyBlock") + b")\x81"))
    found["an Ultralytics model"] = torch_zip_with_pickle(
        folder / "ultra.pt", in_checkpoint(op_global("ultralytics.nn.tasks.DetectionModel") + b")\x81"))
    return found


def compare(path: Path, label: str) -> str:
    theirs, got = torch_weights_only(path), ours(path)
    assert not (theirs is REFUSED and got is not REFUSED), f"{label}: torch refuses it, fxrewrite loads it"
    if theirs is not REFUSED and got is not REFUSED:
        assert_same(got, theirs, label)
        assert_same(ours(path, mmap=True), theirs, label)
        return "both load"
    return "fxrewrite refuses" if got is REFUSED and theirs is not REFUSED else "both refuse"


def test_valid_files_load_as_torch_loads_them(tmp_path, mini):
    outcomes = {label: compare(path, label) for label, path in valid_files(tmp_path, mini).items()}
    assert set(outcomes.values()) == {"both load"}, outcomes


@requires_official
def test_files_of_the_official_code_load_as_torch_loads_them(tmp_path):
    outcomes = {label: compare(path, label) for label, path in official_files(tmp_path).items()}
    assert set(outcomes.values()) == {"both load"}, outcomes


def test_hostile_files_torch_refuses_are_refused_and_more(tmp_path, mini):
    outcomes = {label: compare(path, label) for label, path in hostile_files(tmp_path, mini).items()}
    assert not (tmp_path / "PWNED").exists()
    # what torch's weights_only loader lets through (given the same names), fxrewrite refuses
    assert sorted(k for k, v in outcomes.items() if v == "fxrewrite refuses") == sorted([
        "a constructor call", "stride-0 view", "forward bound to another layer", "100,000 nested dicts"]), outcomes
    assert "both load" not in outcomes.values(), outcomes
