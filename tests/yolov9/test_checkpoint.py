"""Checkpoint I/O: round trips, the official code as oracle, refusals and atomic writes."""
from __future__ import annotations

import copy
import os
import pickle
import pickletools
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fxrewrite.io import OutputError
from fxrewrite.yolov9 import checkpoint as ckpt_mod
from fxrewrite.yolov9.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_safetensors
from fxrewrite.yolov9.catalogue import scoped
from fxrewrite.yolov9.classes import official_aliases, register_block, unregister_block
from fxrewrite.yolov9.model import DetectionModel
from helpers.hostile import EvalPayload, PopenPayload, SystemPayload, Unknown

from helpers.official import official, requires_official

OUR_PREFIXES = ("fxrewrite.yolov9.blocks", "fxrewrite.yolov9.heads", "fxrewrite.yolov9.model")
INPUT = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- helpers
def assert_same(a, b, where="out"):
    """Bitwise equality of nested tensors/lists/tuples."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def forward(model, x=INPUT):
    with torch.no_grad():
        return model.eval()(x.clone())


def data_pkl(path) -> bytes:
    with zipfile.ZipFile(path) as z:
        (name,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
        return z.read(name)


def raw_globals(path) -> set[str]:
    """GLOBAL names exactly as written in the file (independent of the code under test)."""
    found = set()
    for op, arg, _ in pickletools.genops(data_pkl(path)):
        assert op.name != "STACK_GLOBAL"
        if op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
    return found


def torch_zip_with_pickle(path: Path, payload: bytes) -> Path:
    """A genuine torch.save zip whose data.pkl is replaced by ``payload``."""
    torch.save({}, path)
    with zipfile.ZipFile(path) as z:
        records = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in records.items():
            z.writestr(name, payload if name.endswith("/data.pkl") else data)
    return path


def binunicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def dict_with_global(module: str, name: str) -> bytes:
    """Pickle of ``{'model': module.name()}`` built by hand (protocol 2)."""
    return (b"\x80\x02}" + binunicode("model") + f"c{module}\n{name}\n".encode()
            + b")\x81s.")


def leftovers(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


TINY = {  # a few of each kind of layer: quick to build, save and load
    "nc": 3, "depth_multiple": 1.0, "width_multiple": 1.0,
    "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]],
                 [-1, 1, "RepNCSPELAN4", [32, 32, 16, 1]], [-1, 1, "AConv", [48]],
                 [-1, 1, "SPPELAN", [48, 24]]],
    "head": [[[2, 4], 1, "DDetect", ["nc"]]],
}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    model = DetectionModel(TINY).eval()
    model.names = ["cat", "dog", "bird"]
    model.nc = 3  # attached by training, like names
    return model


@pytest.fixture(scope="module")
def gelan_t():
    torch.manual_seed(1)
    model = DetectionModel("gelan-t").eval()
    model.names = [f"class{i}" for i in range(model.yaml["nc"])]
    return model


# --------------------------------------------------------------------------- round trip
def test_round_trip_keeps_classes_weights_and_metadata(tiny, tmp_path):
    out = save_checkpoint(tiny, tmp_path / "tiny.pt", date="2024-01-01")
    loaded = load_checkpoint(out)

    assert loaded.weights == "model"
    assert loaded.stored_dtype == torch.float16
    assert loaded.entries == {"optimizer": None, "updates": None, "best_fitness": None, "epoch": -1,
                              "date": "2024-01-01"}
    assert [type(m) for m in loaded.model.modules()] == [type(m) for m in tiny.modules()]
    expected = {k: (v.half().float() if v.is_floating_point() else v) for k, v in tiny.state_dict().items()}
    got = loaded.model.state_dict()
    assert list(got) == list(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k
    assert loaded.model.names == tiny.names and loaded.model.nc == 3
    assert loaded.model.yaml == tiny.yaml
    assert torch.equal(loaded.model.stride, tiny.stride)
    assert all(not p.requires_grad for p in loaded.model.parameters())

    kept = load_checkpoint(out, dtype=None)
    assert next(kept.model.parameters()).dtype == torch.float16


def test_save_does_not_touch_the_callers_model(tiny, tmp_path):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    grads = [p.requires_grad for p in tiny.parameters()]
    save_checkpoint(tiny, tmp_path / "a.pt")
    after = tiny.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert [p.requires_grad for p in tiny.parameters()] == grads


def test_saved_pickle_names_only_official_torch_and_stdlib_globals(tiny, tmp_path):
    out = save_checkpoint(tiny, tmp_path / "a.pt")
    names = raw_globals(out)
    assert "models.yolo.DetectionModel" in names and "models.common.RepNCSPELAN4" in names
    allowed_prefixes = ("models.yolo.", "models.common.", "torch.", "collections.")
    allowed_builtins = {"__builtin__.set", "builtins.set", "_codecs.encode"}
    assert {n for n in names if not n.startswith(allowed_prefixes)} <= allowed_builtins
    assert b"fxrewrite" not in data_pkl(out)


def test_official_name_table_covers_the_documented_classes():
    table = official_aliases()
    assert table["models.common.Conv"].__module__ == "fxrewrite.yolov9.blocks"
    assert table["models.common.DFL"].__module__ == "fxrewrite.yolov9.heads"
    assert table["models.yolo.DualDDetect"].__module__ == "fxrewrite.yolov9.heads"
    assert table["models.yolo.DetectionModel"] is DetectionModel
    assert all(cls.__module__.startswith(OUR_PREFIXES) for cls in table.values())


# --------------------------------------------------------------------------- official oracle
@pytest.fixture(scope="module")
def official_pgi_checkpoint(tmp_path_factory):
    """A train_dual.py-style checkpoint written by the REAL official classes.

    yolov9-c's exact layer graph (Silence, ADown, CBLinear/CBFuse, DualDDetect)
    with channels / 8, so it is quick to build and run.
    """
    off = official()
    torch.manual_seed(2)
    model = off.build(off.small_cfg("yolov9-c.yaml"))
    ema = copy.deepcopy(model).eval()
    with torch.no_grad():  # EMA weights must differ from the raw ones
        for p in ema.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for m in ema.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ema(torch.zeros(1, 3, 64, 64))  # validation pass: caches shape/anchors/strides on the head
    names = [f"c{i}" for i in range(80)]
    for m in (model, ema):  # what train_dual attaches (ModelEMA.update_attr copies it)
        m.nc, m.names, m.hyp = 80, names, {"lr0": 0.01, "box": 7.5}
        m.class_weights = torch.ones(80)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ckpt = {
        "model": copy.deepcopy(model).half(),
        "ema": copy.deepcopy(ema).half(),
        "updates": 120,
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "best_fitness": np.array([0.25]),
        "opt": {"cfg": "models/detect/yolov9-c.yaml", "epochs": 10, "img_size": [640]},
        "git": {"remote": "x", "branch": "main", "commit": "abc"},
        "date": "2024-03-01T12:00:00",
    }
    path = tmp_path_factory.mktemp("official") / "last.pt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def loaded_pgi(official_pgi_checkpoint):
    return load_checkpoint(official_pgi_checkpoint)


@requires_official
def test_official_checkpoint_loads_into_our_classes_and_matches_forward(official_pgi_checkpoint, loaded_pgi):
    path = official_pgi_checkpoint
    names = raw_globals(path)  # truly the official pickle names
    assert {"models.yolo.DetectionModel", "models.yolo.DualDDetect", "models.common.CBFuse",
            "models.common.CBLinear", "models.common.Silence", "models.common.ADown"} <= names

    assert loaded_pgi.weights == "ema"
    assert loaded_pgi.epoch == 3 and loaded_pgi.entries["updates"] == 120
    assert loaded_pgi.entries["best_fitness"].tolist() == [0.25]
    assert type(loaded_pgi.model) is DetectionModel
    assert all(type(m).__module__.startswith(OUR_PREFIXES + ("torch.nn.",)) for m in loaded_pgi.model.modules())

    reference = torch.load(path, map_location="cpu", weights_only=False)
    assert type(reference["ema"]).__module__ == "models.yolo"
    official_ema = reference["ema"].float().eval()
    assert loaded_pgi.model.names == official_ema.names
    ours_sd, theirs_sd = loaded_pgi.model.state_dict(), official_ema.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    assert all(torch.equal(ours_sd[k], theirs_sd[k]) for k in ours_sd)
    # EMA, not the raw weights, was picked
    raw_sd = reference["model"].float().state_dict()
    assert not all(torch.equal(ours_sd[k], raw_sd[k]) for k in ours_sd)

    assert_same(forward(loaded_pgi.model), forward(official_ema))


@requires_official
def test_official_segmentation_checkpoint_loads_and_converts(tmp_path):
    """The official segmentation heads keep the detection head's forward function as an instance
    attribute (``self.detect = DualDDetect.forward``), which pickle writes as
    ``getattr(models.yolo.DualDDetect, 'forward')``: the loader must accept exactly that."""
    from fxrewrite.yolov9 import SegmentationModel, convert

    off = official()
    torch.manual_seed(3)
    model = off.build(off.small_cfg("yolov9-c-dseg.yaml")).eval()
    path = tmp_path / "seg.pt"
    torch.save({"model": copy.deepcopy(model).half(), "ema": None, "epoch": 2}, path)
    assert "builtins.getattr" in {n.replace("__builtin__.", "builtins.") for n in raw_globals(path)}
    loaded = load_checkpoint(path)
    assert type(loaded.model) is SegmentationModel
    assert loaded.model.model[-1].detect.__qualname__ == "DualDDetect.forward"
    x = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model.half().float()(x)
        got = loaded.model.eval()(x)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1][2], expected[1][2])
        converted = convert(loaded.model).model(x)
        assert torch.equal(converted[0], expected[0]) and torch.equal(converted[1][2], expected[1][2])


@requires_official
@pytest.mark.parametrize("which", ["pgi-from-official", "gelan-built-by-us"])
def test_our_checkpoint_loads_and_runs_in_the_official_code(which, request, tmp_path):
    official()  # models.* importable, as in a checkout of the reference repository
    ours = request.getfixturevalue("loaded_pgi").model if which.startswith("pgi") else request.getfixturevalue("gelan_t")
    out = save_checkpoint(ours, tmp_path / "ours.pt")
    theirs = torch.load(out, map_location="cpu", weights_only=False)
    assert theirs["ema"] is None and theirs["epoch"] == -1
    model = theirs["model"]
    assert type(model).__module__ == "models.yolo" and type(model).__name__ == "DetectionModel"
    assert next(model.parameters()).dtype == torch.float16
    ours_fp16_roundtrip = load_checkpoint(out).model
    assert_same(forward(model.float()), forward(ours_fp16_roundtrip))


# --------------------------------------------------------------------------- malicious files
@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PWNED"


def refused(path, name):
    return (f"{path}: refused to load: the pickle references {name}, which is not allowed in a YOLOv9 "
            "checkpoint; nothing from the file was executed")


def test_payload_is_live_under_plain_pickle(tmp_path, marker):
    # Sanity check of the test itself: the payload really runs when unpickled unsafely.
    pickle.loads(pickle.dumps(EvalPayload(marker)))
    assert marker.exists()


def test_refuses_handcrafted_os_system(tmp_path, marker):
    payload = b"\x80\x02cos\nsystem\n" + binunicode(f"touch {marker}") + b"\x85R."
    path = torch_zip_with_pickle(tmp_path / "evil.pt", payload)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == refused(path, "os.system")
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload, name",
    [(EvalPayload, "builtins.eval"), (PopenPayload, "subprocess.Popen"),
     (SystemPayload, f"{os.system.__module__}.system")],
)
def test_refuses_reduce_payloads(tmp_path, marker, payload, name):
    path = tmp_path / "evil.pt"
    torch.save({"model": None, "epoch": payload(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == refused(path, name)
    assert not marker.exists()


def test_refuses_payload_hidden_beside_a_real_model(tiny, tmp_path, marker):
    path = tmp_path / "evil.pt"
    torch.save({"model": nn.Conv2d(1, 1, 1), "date": SystemPayload(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == refused(path, f"{os.system.__module__}.system")
    assert not marker.exists()


def test_refuses_unknown_class(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": None, "x": Unknown()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == refused(path, f"{Unknown.__module__}.Unknown")


def test_refuses_stack_global_payload(tmp_path, marker):
    payload = pickle.dumps(EvalPayload(marker), protocol=4)  # STACK_GLOBAL instead of GLOBAL
    path = torch_zip_with_pickle(tmp_path / "evil.pt", payload)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == refused(path, "builtins.eval")
    assert not marker.exists()


@pytest.mark.parametrize("payload, name", [(SystemPayload, f"{os.system.__module__}.system"),
                                           (EvalPayload, "builtins.eval"), (Unknown, None)])
def test_the_unpicklers_allow_list_alone_also_refuses(tmp_path, marker, monkeypatch, payload, name):
    # Defence in depth: with the explanation (a scan of the pickle's globals) disabled, the
    # restricted unpickler itself refuses the first global it is asked for, with the same message.
    monkeypatch.setattr(ckpt_mod, "_vet_globals", lambda found, shown: None)
    path = tmp_path / "evil.pt"
    torch.save({"model": None, "x": payload(marker) if name else payload()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == refused(path, name or f"{Unknown.__module__}.Unknown")
    assert not marker.exists()


def test_saver_refuses_globals_the_loader_would_refuse(tiny, tmp_path, marker):
    path = tmp_path / "a.pt"
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tiny, path, git=SystemPayload(marker))
    assert str(err.value) == (f"{path}: cannot save: the checkpoint would reference "
                              f"{os.system.__module__}.system, which load_checkpoint does not allow; "
                              "nothing was written")
    assert leftovers(tmp_path) == [] and not marker.exists()


# --------------------------------------------------------------------------- other error cases
def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=None) as err:
        load_checkpoint(path)
    assert str(err.value) == f"{path}: no such file"


def test_directory(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert str(err.value) == f"{tmp_path}: is a directory, not a checkpoint file"


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == f"{path}: file is empty (0 bytes), not a checkpoint"


def test_truncated_zip(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"model": nn.Conv2d(3, 8, 3)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == f"{path}: truncated or corrupt zip archive (no end-of-archive record)"


def test_corrupt_zip_member(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"model": None, "epoch": 1}, path)
    raw = bytearray(path.read_bytes())
    start = raw.index(b"\x80\x02")  # first byte of data.pkl's pickle stream
    raw[start + 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == f"{path}: truncated or corrupt zip archive (Bad CRC-32 for file 'bad/data.pkl')"


def test_zip_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes/readme.txt", "hello")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == f"{path}: a zip archive but not a torch checkpoint (no data.pkl record)"


def test_legacy_torch_format(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"model": None}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == (f"{path}: legacy (pre-1.6, non-zip) torch file format; it cannot be loaded "
                              "safely, only torch.save zip checkpoints are supported")


def test_plain_pickle_and_other_files(tmp_path):
    pkl, txt = tmp_path / "a.pkl", tmp_path / "a.txt"
    pkl.write_bytes(pickle.dumps({"model": None}))
    txt.write_text("hello")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(pkl)
    assert str(err.value) == f"{pkl}: a plain pickle file, not a torch.save checkpoint; refused (nothing was executed)"
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(txt)
    assert str(err.value) == f"{txt}: not a torch checkpoint (not a zip archive)"


def test_ultralytics_checkpoint(tmp_path):
    path = torch_zip_with_pickle(tmp_path / "yolov8n.pt", dict_with_global("ultralytics.nn.tasks", "DetectionModel"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == (f"{path}: an Ultralytics checkpoint (it references ultralytics.nn.tasks.DetectionModel); "
                              "that is a different format from WongKinYiu/yolov9 checkpoints and is not supported")


def test_missing_model_entry(tmp_path):
    path = tmp_path / "a.pt"
    torch.save({"epoch": 3, "optimizer": None}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == f"{path}: checkpoint has no 'model' or 'ema' entry (top-level keys: epoch, optimizer)"

    torch.save({"model": None, "ema": None}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == f"{path}: checkpoint's 'model' entry is empty (None) and it has no 'ema' weights"


def test_bare_state_dict(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(nn.Conv2d(3, 8, 3).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == (f"{path}: a bare state_dict (2 tensors, e.g. 'weight'), not a checkpoint with a "
                              "pickled model; build the model from its config and use load_state_dict instead")

    torch.save({"model": nn.Conv2d(3, 8, 3).state_dict(), "epoch": 1}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == (f"{path}: the 'model' entry is a bare state_dict, not a pickled model; build the "
                              "model from its config and use load_state_dict instead")


def test_non_dict_checkpoint(tmp_path):
    path = tmp_path / "a.pt"
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == f"{path}: expected a checkpoint dict, found a list"


class MyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def test_unknown_custom_block_and_register_block(tmp_path):
    path = tmp_path / "custom.pt"
    with scoped():
        register_block(MyBlock, "models.common.MyBlock")
        save_checkpoint(MyBlock(), path)
    assert "models.common.MyBlock" in raw_globals(path)

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == (
        f"{path}: the model uses block classes unknown to fxrewrite: models.common.MyBlock; if you trust the code "
        "they come from, rerun with --code PATH_TO_THAT_REPO (the folder that holds models/; from Python: "
        "load_checkpoint(path, code=PATH)); library users may instead implement each as an nn.Module and register "
        "it before loading, e.g. fxrewrite.yolov9.register_block(MyBlock, 'models.common.MyBlock')")

    register_block(MyBlock, "models.common.MyBlock")
    try:
        loaded = load_checkpoint(path)
    finally:
        unregister_block("models.common.MyBlock")  # by its official name; the catalogue forgets it
    assert "models.common.MyBlock" not in official_aliases()
    assert type(loaded.model) is MyBlock
    assert loaded.model(torch.ones(1, 3, 2, 2)).shape == (1, 4, 2, 2)


def test_register_block_rejects_conflicts():
    with pytest.raises(ValueError, match="models.common.Conv already loads as Conv"):
        register_block(MyBlock, "models.common.Conv")
    with pytest.raises(ValueError, match="is not a dotted name"):
        register_block(MyBlock, "MyBlock")
    with pytest.raises(TypeError, match="is not an nn.Module subclass"):
        register_block(int, "models.common.Int")


def test_cannot_save_a_model_without_official_names(tmp_path):
    path = tmp_path / "a.pt"
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(nn.Sequential(nn.Conv2d(1, 1, 1)), path)
    assert str(err.value) == (f"{path}: cannot save a Sequential: only models whose classes have official names "
                              "(fxrewrite.yolov9 DetectionModel / SegmentationModel) can be saved in the YOLOv9 format")
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- atomic output
def test_failed_save_leaves_nothing(tiny, tmp_path, monkeypatch):
    def half_written(obj, f, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny, tmp_path / "a.pt")
    assert leftovers(tmp_path) == []


def test_failed_save_keeps_existing_target(tiny, tmp_path, monkeypatch):
    target = tmp_path / "a.pt"
    target.write_bytes(b"previous")

    def half_written(obj, f, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", half_written)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny, target, force=True)
    assert target.read_bytes() == b"previous"
    assert leftovers(tmp_path) == ["a.pt"]


def test_refuses_overwrite_without_force(tiny, tmp_path):
    target = tmp_path / "a.pt"
    target.write_bytes(b"previous")
    with pytest.raises(OutputError) as err:
        save_checkpoint(tiny, target)
    assert str(err.value) == f"{target}: output already exists (use force=True / --force to overwrite)"
    assert target.read_bytes() == b"previous"
    save_checkpoint(tiny, target, force=True)
    assert load_checkpoint(target).weights == "model"


def test_refuses_output_equal_to_input(tiny, tmp_path):
    source = tmp_path / "in.pt"
    save_checkpoint(tiny, source)
    before = source.read_bytes()
    (tmp_path / "link.pt").hardlink_to(source)
    for output in (source, tmp_path / "sub" / ".." / "in.pt", tmp_path / "link.pt"):
        with pytest.raises(OutputError) as err:
            save_checkpoint(tiny, output, force=True, inputs=[source])
        assert str(err.value) == (f"{output}: output is the same file as the input {source}; "
                                  "refusing to overwrite an input")
    assert source.read_bytes() == before


# --------------------------------------------------------------------------- safetensors
def test_save_safetensors(tiny, tmp_path):
    from safetensors import safe_open
    import yaml

    st, cfg = save_safetensors(tiny, tmp_path / "tiny")
    assert (st.name, cfg.name) == ("tiny.safetensors", "tiny.yaml")
    with safe_open(str(st), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    expected = tiny.state_dict()
    assert set(tensors) == set(expected)
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    assert yaml.safe_load(cfg.read_text()) == tiny.yaml
    assert meta["nc"] == str(tiny.yaml["nc"])
    with pytest.raises(OutputError):
        save_safetensors(tiny, tmp_path / "tiny")


def test_save_safetensors_without_the_package(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError) as err:
        save_safetensors(tiny, tmp_path / "tiny")
    assert str(err.value) == (f"{tmp_path / 'tiny'}: writing safetensors needs the optional package "
                              "'safetensors' (pip install 'fxrewrite[safetensors]')")
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- fast renaming on save
def _renaming_spy(monkeypatch):
    """Record, for every save, what the memo-guided renaming wrote and what the opcode walk writes."""
    seen = []
    fast = ckpt_mod._official_globals_by_memo

    def spy(data, memo, renames, loadable):
        quick = fast(data, memo, renames, loadable)
        seen.append((quick, ckpt_mod._official_globals(data, renames, loadable)))
        return quick

    monkeypatch.setattr(ckpt_mod, "_official_globals_by_memo", spy)
    return seen


@pytest.mark.parametrize("name", ["gelan-t", "yolov9-c", "yolov9-c-dseg"])
def test_memo_guided_renaming_writes_what_the_opcode_walk_writes(monkeypatch, tmp_path, name):
    from fxrewrite.yolov9 import SegmentationModel

    seen = _renaming_spy(monkeypatch)
    torch.manual_seed(0)
    model = (SegmentationModel if "seg" in name else DetectionModel)(name)
    save_checkpoint(model, tmp_path / "m.pt")
    [(quick, walked)] = seen
    assert quick is not None and quick == walked
    assert b"fxrewrite" not in quick.replace(b"fxrewrite.yolov9", b"")  # no class path of ours is left
    assert load_checkpoint(tmp_path / "m.pt").model.state_dict().keys() == model.state_dict().keys()


def test_a_string_spelling_a_global_makes_the_save_fall_back_to_the_opcode_walk(monkeypatch, tmp_path):
    """A class name that spells out a GLOBAL opcode (with the memo index the pickler gave Conv) makes
    the byte pattern ambiguous: the opcode walk renames instead, and the string survives intact."""
    seen = _renaming_spy(monkeypatch)
    torch.manual_seed(0)
    model = DetectionModel("gelan-t")
    save_checkpoint(model, tmp_path / "probe.pt")
    data = seen[0][1]
    at = data.index(b"cmodels.common\nConv\n")
    put = data[at + len(b"cmodels.common\nConv\n"):][:2]  # BINPUT k, as the pickler wrote it
    assert put[:1] == b"q"
    crafted = "cfxrewrite.yolov9.blocks\nConv\n" + put.decode("latin-1")
    model.names = [crafted] + model.names[1:]
    save_checkpoint(model, tmp_path / "m.pt")
    quick, walked = seen[1]
    assert quick is None and walked is not None
    assert load_checkpoint(tmp_path / "m.pt").model.names[0] == crafted
