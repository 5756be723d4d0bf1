"""Hostile and broken inputs, through the command line: every one is refused with one line on
stderr, exit code 1, no traceback, no output file, and no payload ever runs.

Inputs: checkpoints whose pickle calls something outside the allow-list (os.system, eval,
exec, subprocess, __import__ gadgets, unknown classes), broken files (truncated, empty,
a zip that is not a checkpoint, a legacy torch file, no model, a bare state_dict), weights
that contradict their config, and bad or hostile model configs (unknown module, ``from``
out of range, negative repeats, absurd widths -- refused without allocating memory -- and
YAML alias bombs or deep nesting).
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from fxrewrite.yolov9 import DetectionModel
from fxrewrite.yolov9.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fxrewrite.yolov9.model import ConfigError

from helpers.hostile import (MINI, EvilModule, assert_one_line_error, binunicode, handcrafted_payloads,
                             in_checkpoint, listing, nested_ordered_dicts, op_global, op_int, op_tuple,
                             payload_is_live, read_records, record_data_offset, record_holding, reduce_payloads,
                             run_cli, torch_zip_with_pickle, write_config, write_records)

COMMANDS = {  # the command line for an input file, and the output it must not create
    "convert": lambda src, out: ["convert", src, "-o", out / "gelan.pt"],
    "draw": lambda src, out: ["draw", src, "-o", out / "drawing.dot"],
}


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PWNED"


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def mini_model():
    torch.manual_seed(0)
    return DetectionModel(copy.deepcopy(MINI)).eval()


def refusal(path, name: str) -> str:
    return (f"{path}: refused to load: the pickle references {name}, which is not allowed in a YOLOv9 "
            "checkpoint; nothing from the file was executed")


# ---------------------------------------------------------------------------- payloads
@pytest.mark.parametrize("name", list(handcrafted_payloads(Path("x"))))
def test_handcrafted_payloads_are_live(tmp_path, marker, name):
    """The test's own check: each hand-written pickle does run its command when unpickled unsafely."""
    data, _ = handcrafted_payloads(marker)[name]
    pickle.loads(data)
    assert marker.exists()


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name", list(handcrafted_payloads(Path("x"))))
def test_handcrafted_payload_is_refused_by_the_cli(capsys, tmp_path, marker, out, command, name):
    data, refused_name = handcrafted_payloads(marker)[name]
    src = torch_zip_with_pickle(tmp_path / "evil.pt", data)
    code, stdout, err = run_cli(capsys, *COMMANDS[command](src, out))
    assert (code, stdout) == (1, "")
    assert_one_line_error(err)
    assert err == f"fxrewrite: error: {refusal(src, refused_name)}\n"
    assert not marker.exists()
    assert listing(out) == []


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name", list(reduce_payloads()))
def test_reduce_payload_is_refused_by_the_cli(capsys, tmp_path, marker, out, command, name):
    payload_cls, refused_name = reduce_payloads()[name]
    assert payload_is_live(payload_cls, marker)
    src = tmp_path / "evil.pt"
    torch.save({"model": None, "epoch": payload_cls(marker)}, src)
    code, stdout, err = run_cli(capsys, *COMMANDS[command](src, out))
    assert (code, stdout) == (1, "")
    assert_one_line_error(err)
    assert err == f"fxrewrite: error: {refusal(src, refused_name)}\n"
    assert not marker.exists()
    assert listing(out) == []


def test_payload_inside_a_real_model_is_refused(capsys, tmp_path, marker, out, mini_model):
    """A genuine checkpoint (the model under official names) with a payload hidden in one layer's state."""
    src = tmp_path / "evil.pt"
    evil = copy.deepcopy(mini_model)
    evil.model[1].extra = EvilModule(marker)  # pickled with the model: os.system inside the layer tree
    torch.save({"model": evil, "epoch": 3}, src)
    code, _, err = run_cli(capsys, "convert", src, "-o", out / "gelan.pt")
    assert code == 1
    assert_one_line_error(err, f"{src}: refused to load: the pickle references ")
    assert f"{os.system.__module__}.system" in err
    assert not marker.exists() and listing(out) == []


def test_getattr_gadget_is_limited_to_forward_fuse(capsys, tmp_path, marker, out):
    """``builtins.getattr`` is allowed (fused blocks pickle ``getattr(block, 'forward_fuse')``), but only
    for that: ``getattr(<allowed class>, '__init__')`` or any other name is refused while loading."""
    data = (b"\x80\x02c__builtin__\ngetattr\nccollections\nOrderedDict\n" + b"X\x08\x00\x00\x00__init__"
            + b"\x86R.")
    src = torch_zip_with_pickle(tmp_path / "gadget.pt", data)
    code, _, err = run_cli(capsys, "convert", src, "-o", out / "gelan.pt")
    assert code == 1
    assert_one_line_error(err, f"{src}: refused to load: ")
    assert "forward_fuse" in err and "nothing from the file was executed" in err
    assert listing(out) == []


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_the_unpicklers_allow_list_alone_also_refuses(tmp_path, marker, monkeypatch):
    """Defence in depth: with the explanation (a scan of every global the pickle names) disabled, the
    restricted unpickler itself still refuses, naming the first global it was asked for."""
    from fxrewrite.yolov9 import checkpoint as ckpt_mod

    monkeypatch.setattr(ckpt_mod, "_vet_globals", lambda found, shown: None)
    for name, (data, refused_name) in handcrafted_payloads(marker).items():
        src = torch_zip_with_pickle(tmp_path / "evil.pt", data)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(src)
        assert str(err.value).startswith(f"{src}: refused to load: "), name
        assert not marker.exists(), name


# ---------------------------------------------------------------------------- broken files
def broken_inputs(folder: Path, model) -> dict[str, tuple[Path, str]]:
    """Each broken input and the start of the exact message the CLI prints for it."""
    found = {}
    good = save_checkpoint(model, folder / "good.pt")
    data = good.read_bytes()
    for fraction in (0.1, 0.5, 0.99):
        path = folder / f"truncated-{fraction}.pt"
        path.write_bytes(data[: int(len(data) * fraction)])
        found[f"truncated to {fraction:.0%}"] = (path, f"{path}: truncated or corrupt zip archive")
    empty = folder / "empty.pt"
    empty.write_bytes(b"")
    found["zero bytes"] = (empty, f"{empty}: file is empty (0 bytes), not a checkpoint")
    notes = folder / "notes.zip"
    with zipfile.ZipFile(notes, "w") as z:
        z.writestr("notes/readme.txt", "hello")
    found["a zip that is not a checkpoint"] = (notes, f"{notes}: a zip archive but not a torch checkpoint "
                                                      "(no data.pkl record)")
    legacy = folder / "legacy.pt"
    torch.save({"model": None}, legacy, _use_new_zipfile_serialization=False)
    found["legacy torch file"] = (legacy, f"{legacy}: legacy (pre-1.6, non-zip) torch file format")
    plain = folder / "plain.pkl"
    plain.write_bytes(pickle.dumps({"model": None}))
    found["a plain pickle"] = (plain, f"{plain}: a plain pickle file, not a torch.save checkpoint")
    no_model = folder / "no-model.pt"
    torch.save({"epoch": 3, "optimizer": None}, no_model)
    found["no model entry"] = (no_model, f"{no_model}: checkpoint has no 'model' or 'ema' entry")
    none_model = folder / "none-model.pt"
    torch.save({"model": None, "ema": None}, none_model)
    found["model is None"] = (none_model, f"{none_model}: checkpoint's 'model' entry is empty (None)")
    bare = folder / "state-dict.pt"
    torch.save(model.state_dict(), bare)
    found["a bare state_dict"] = (bare, f"{bare}: a bare state_dict")
    entry = folder / "state-dict-entry.pt"
    torch.save({"model": model.state_dict(), "epoch": 1}, entry)
    found["model entry is a state_dict"] = (entry, f"{entry}: the 'model' entry is a bare state_dict")
    listed = folder / "list.pt"
    torch.save([1, 2, 3], listed)
    found["not a dict"] = (listed, f"{listed}: expected a checkpoint dict, found a list")
    text = folder / "model.yaml"
    text.write_text("nc: 80\n")
    found["a text file"] = (text, f"{text}: not a torch checkpoint (not a zip archive)")
    found["a folder"] = (folder, f"{folder}: is a directory, not a checkpoint file")
    found["no such file"] = (folder / "nope.pt", f"{folder / 'nope.pt'}: no such file")
    return found


BROKEN = ["truncated to 10%", "truncated to 50%", "truncated to 99%", "zero bytes", "a zip that is not a checkpoint",
          "legacy torch file", "a plain pickle", "no model entry", "model is None", "a bare state_dict",
          "model entry is a state_dict", "not a dict", "a text file", "a folder", "no such file"]


@pytest.fixture(scope="module")
def broken(tmp_path_factory, mini_model):
    folder = tmp_path_factory.mktemp("broken")
    return broken_inputs(folder, mini_model)


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", BROKEN)
def test_broken_input_gets_a_specific_message(capsys, out, broken, command, case):
    src, message = broken[case]
    before = src.read_bytes() if src.is_file() else None
    code, stdout, err = run_cli(capsys, *COMMANDS[command](src, out))
    assert (code, stdout) == (1, "")
    assert_one_line_error(err, message)
    assert listing(out) == []
    if before is not None:
        assert src.read_bytes() == before


def test_every_broken_case_is_listed(broken):
    assert sorted(broken) == sorted(BROKEN)


# ---------------------------------------------------------------------------- weights vs config
def contradicting(model, case: str):
    """A copy of ``model`` whose tensors contradict its config (as a corrupt or hand-edited checkpoint would)."""
    bad = copy.deepcopy(model)
    if case == "conv with 8 of 16 output channels":
        conv = bad.model[2].conv
        conv.weight = torch.nn.Parameter(conv.weight.detach()[:8].clone())
    elif case == "conv reading 8 of 16 input channels":
        conv = bad.model[3].conv
        conv.weight = torch.nn.Parameter(conv.weight.detach()[:, :8].clone())
    elif case == "batchnorm statistics too short":
        bad.model[1].bn.running_var = bad.model[1].bn.running_var[:4].clone()
    elif case == "config says 32 channels, weights have 16":
        bad.yaml["backbone"][2][3][0] = 32
    elif case == "head weight of the wrong width":
        conv = bad.model[-1].cv4[0][0].conv
        conv.weight = torch.nn.Parameter(conv.weight.detach()[:, :4].clone())
    return bad


CONTRADICTIONS = {
    "conv with 8 of 16 output channels": "model.2.conv.weight has shape (8, 8, 3, 3), the config makes it (16, 8, 3, 3)",
    "conv reading 8 of 16 input channels": "model.3.conv.weight has shape (16, 8, 3, 3), the config makes it "
                                           "(16, 16, 3, 3)",
    "batchnorm statistics too short": "model.1.bn.running_var has shape (4,), the config makes it (8,)",
    "config says 32 channels, weights have 16": "model.2.conv.weight has shape (16, 8, 3, 3), the config makes it "
                                                "(32, 8, 3, 3)",
    "head weight of the wrong width": "model.7.cv4.0.0.conv.weight has shape (64, 4, 3, 3), the config makes it "
                                      "(64, 16, 3, 3)",
}


@pytest.mark.parametrize("case", list(CONTRADICTIONS))
def test_weights_contradicting_the_config_fail_with_a_specific_error(capsys, tmp_path, out, mini_model, case):
    src = save_checkpoint(contradicting(mini_model, case), tmp_path / "bad.pt")
    code, stdout, err = run_cli(capsys, "convert", src, "-o", out / "gelan.pt")
    assert (code, stdout) == (1, "")
    assert_one_line_error(err)
    assert err == (f"fxrewrite: error: {src}: the weights contradict the model's config (yaml): "
                   f"{CONTRADICTIONS[case]}\n")
    assert listing(out) == []


def test_contradiction_from_python_is_a_conversion_error(mini_model):
    from fxrewrite.yolov9 import convert
    from fxrewrite.yolov9.convert import ConversionError

    with pytest.raises(ConversionError) as err:
        convert(contradicting(mini_model, "conv with 8 of 16 output channels"))
    assert str(err.value) == ("the weights contradict the model's config (yaml): "
                              + CONTRADICTIONS["conv with 8 of 16 output channels"])


# ---------------------------------------------------------------------------- configs
def mini_with(*layers, **changes):
    """MINI with ``layers`` inserted as layers 5, 6, ... (before the head; nothing after them is reached)."""
    config = copy.deepcopy(MINI)
    config["head"][:0] = list(layers)
    config.update(changes)
    return config


BAD_CONFIGS = {
    "unknown module": (mini_with([-1, 1, "EvilBlock", []]), "layer 5: unknown module 'EvilBlock'. Known modules: "),
    "a module spelled like code": (mini_with([-1, 1, "os.system", ["touch x"]]), "layer 5: unknown module 'os.system'"),
    "'from' out of range": (mini_with([[-1, 9], 1, "Concat", [1]]),
                            "layer 5: 'from' index 9 is out of range (allowed: layers 0..4 or offsets -1..-5)"),
    "'from' too far back": (mini_with([-6, 1, "Conv", [8, 1, 1]]), "layer 5: 'from' index -6 is out of range"),
    "negative repeat count": (mini_with([-1, -3, "Conv", [8, 1, 1]]),
                              "layer 5: repeat count must be a positive integer, got -3"),
    "absurd repeat count": (mini_with([-1, 10**9, "Conv", [8, 1, 1]]),
                            "layer 5: repeat count 1000000000 exceeds the limit of 1000"),
    "infinite depth": (mini_with([-1, 3, "Conv", [8, 1, 1]], depth_multiple=1e308),
                       "layer 5: repeat count inf exceeds the limit of 1000"),
    "width 1e6": (mini_with(width_multiple=1e6),
                  "layer 1: output channel count 8 x width_multiple 1000000.0 exceeds the limit of 65536 channels"),
    "width 1e308": (mini_with(width_multiple=1e308),
                    "layer 1: output channel count 8 x width_multiple 1e+308 exceeds the limit of 65536 channels"),
    "negative width": (mini_with(width_multiple=-1), "width_multiple must be a positive number, got -1"),
    "too many parameters": (mini_with([-1, 1, "Conv", [60_000, 1, 1]], [-1, 1, "Conv", [60_000, 7, 1]]),
                            "layer 6: the model would exceed 2,000,000,000 parameters"),
    "a string where a channel count goes": (mini_with([-1, 1, "Conv", ["__import__('os').system('x')", 3, 1]]),
                                            "layer 5: output channel count must be a positive integer"),
    "activation written as code": (mini_with(activation="__import__('os').system('x')"),
                                   "unsupported activation"),
    "no head": ({k: v for k, v in MINI.items() if k != "head"}, "missing top-level key 'head'"),
    "head is not a list": (mini_with(head="DualDDetect"), "'backbone' and 'head' must be lists of layers"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_refused_by_the_cli(capsys, tmp_path, out, case):
    config, message = BAD_CONFIGS[case]
    path = write_config(tmp_path / "bad.yaml", config)
    code, stdout, err = run_cli(capsys, "convert", "--config", path, "-o", out / "gelan.pt")
    assert (code, stdout) == (1, "")
    assert_one_line_error(err, f"{path}, {message}" if message.startswith("layer") else None)
    assert message in err
    assert listing(out) == []


HOSTILE_CONFIG_TEXTS = {
    "billion laughs": ("l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
                       + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9))
                       + "nc: *l8\ndepth_multiple: 1\nwidth_multiple: 1\nbackbone: []\nhead: []\n",
                       "refused: the document expands to more than 1,000,000 nodes and characters"),
    "deep nesting": ("nc: 1\nbackbone: " + "[" * 10_000 + "]" * 10_000 + "\n", "refused: nested more than 64 levels"),
    "recursive alias": ("nc: 1\nbackbone: &b [*b]\n", "refused: an alias refers to a node that contains it"),
    "python tag": ("!!python/object/apply:os.system ['touch /tmp/fxrewrite-pwned']\n",
                   "invalid YAML (line 1): could not determine a constructor for the tag"),
    "impossible date": ("nc: 2001-02-30\n", "invalid YAML: a value cannot be read (day is out of range for month)"),
    "not a mapping": ("- 1\n- 2\n", "a model config must be a YAML mapping, got list"),
}


@pytest.mark.parametrize("case", list(HOSTILE_CONFIG_TEXTS))
def test_hostile_config_yaml_is_refused(capsys, tmp_path, out, case):
    text, message = HOSTILE_CONFIG_TEXTS[case]
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    code, stdout, err = run_cli(capsys, "convert", "--config", path, "-o", out / "gelan.pt")
    assert (code, stdout) == (1, "")
    assert_one_line_error(err, f"{path}: {message}")
    assert listing(out) == [] and not Path("/tmp/fxrewrite-pwned").exists()


def test_config_that_is_not_utf8(capsys, tmp_path, out):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("nc: 1  # café\n".encode("latin-1"))
    code, _, err = run_cli(capsys, "convert", "--config", path, "-o", out / "gelan.pt")
    assert code == 1
    assert_one_line_error(err, f"{path}: not a text file (not UTF-8)")


MEMORY_PROBE = """
import resource, sys
import torch
from fxrewrite.yolov9 import DetectionModel
from fxrewrite.yolov9.config import load_config
from fxrewrite.yolov9.model import ConfigError
for name in ("gelan-t", "yolov9-e"):
    load_config(name)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
refused = []
for name, width in (("gelan-t", 1e6), ("yolov9-e", 1e6), ("gelan-t", 100.0), ("yolov9-e", 30.0)):
    config = load_config(name)
    config["width_multiple"] = width
    try:
        DetectionModel(config)
    except ConfigError as error:
        refused.append(str(error).split(":")[0])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(refused), (after - before) // 1024)
"""


def test_absurd_width_is_refused_without_allocating_memory():
    """width_multiple 1e6 (channel limit) and 100 / 30 (parameter limit, checked on the meta device): the
    process's peak memory grows by less than 100 MB, where building the models would need gigabytes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    refused, grown_mb = map(int, done.stdout.split())
    assert refused == 4
    assert grown_mb < 100, f"peak memory grew by {grown_mb} MB"


def test_config_errors_from_python_are_config_errors():
    for case in ("width 1e308", "infinite depth", "unknown module", "'from' out of range", "negative repeat count"):
        config, message = BAD_CONFIGS[case]
        with pytest.raises(ConfigError) as err:
            DetectionModel(config)
        assert message in str(err.value), case


def test_an_oversized_pickle_record_is_refused_before_it_is_read(capsys, tmp_path, out, mini_model, monkeypatch):
    """A zip bomb (a small, deflated data.pkl declaring gigabytes) is refused from its declared size."""
    from fxrewrite.yolov9 import checkpoint as ckpt_mod

    src = save_checkpoint(mini_model, tmp_path / "big.pt")
    with zipfile.ZipFile(src) as z:
        size = z.getinfo(next(n for n in z.namelist() if n.endswith("/data.pkl"))).file_size
    monkeypatch.setattr(ckpt_mod, "MAX_PICKLE_BYTES", size - 1)
    code, _, err = run_cli(capsys, "convert", src, "-o", out / "gelan.pt")
    assert code == 1
    assert err == (f"fxrewrite: error: {src}: refused: its data.pkl record is {size:,} bytes, more than the "
                   f"{size - 1:,} a model's pickle takes (tensors are stored apart)\n")
    assert listing(out) == []


def test_a_zip_bomb_is_refused_from_its_declared_sizes(capsys, tmp_path, out, mini_model):
    """Records declaring far more bytes than the file could hold (deflate bombs) are refused unread."""
    import struct

    src = save_checkpoint(mini_model, tmp_path / "bomb.pt")
    data = bytearray(src.read_bytes())
    central = data.index(b"PK\x01\x02")  # the first record's central-directory entry: declare 4 GB
    data[central + 24:central + 28] = struct.pack("<I", 0xFFFF0000)
    src.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "convert", src, "-o", out / "gelan.pt")
    assert code == 1
    assert_one_line_error(err, f"{src}: refused: its records would expand to ")
    assert err.endswith(f"bytes from a {len(data):,}-byte file (a zip bomb?)\n")
    assert listing(out) == []


def test_a_damaged_zip_header_is_a_checkpoint_error(tmp_path):
    """Found by scripts/fuzz_rules.py: a local header whose name length runs into the pickle made
    zipfile raise UnicodeDecodeError, which escaped load_checkpoint. The loader now compares every local
    header with the directory itself and names the damaged record (the old message only said
    "UnicodeDecodeError")."""
    path = tmp_path / "damaged.pt"
    torch.save({"model": None}, path)
    data = bytearray(path.read_bytes())
    data[27] = 0x01  # the first record's local file-name length grows by 256 bytes (into the pickle)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == (f"{path}: truncated or corrupt zip archive (record 'damaged/data.pkl': its local "
                              "header names another file)")


# ---------------------------------------------------------------------------- integrity and bombs (issue 11)
NOT_RUN = "; nothing from the file was executed"


def refused_by_cli(capsys, src: Path, out: Path, message: str, *, mmap_too: bool = True) -> None:
    """``convert`` (which maps tensors from the file) and ``load_checkpoint`` without mmap both refuse with
    exactly ``message``: exit 1, one line, no traceback, no output, the input unchanged."""
    before = src.read_bytes()
    code, stdout, err = run_cli(capsys, "convert", src, "-o", out / "gelan.pt")
    assert (code, stdout) == (1, "")
    assert_one_line_error(err)
    assert err == f"fxrewrite: error: {message}\n"
    assert listing(out) == [] and src.read_bytes() == before
    if mmap_too:
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(src, mmap=False)
        assert str(info.value) == message


def constructor_bomb(path: Path) -> Path:
    """1.3 KB: a checkpoint whose pickle calls models.common.Conv(16384, 16384, 3) -- 9.6 GB of weights."""
    call = op_global("models.common.Conv") + op_tuple(op_int(16384), op_int(16384), op_int(3)) + b"R"
    return torch_zip_with_pickle(path, in_checkpoint(call))


class Rebuild:
    """Pickles as a tensor view of ``storage`` with any size and stride (what a crafted file can say)."""

    def __init__(self, storage, size, stride):
        self.args = (storage, 0, size, stride, False, __import__("collections").OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def stride_0_bomb(path: Path, model) -> Path:
    """8 MB: a real checkpoint plus a stride-0 view of a 2M-element storage, 2**31 elements long (8.6 GB as fp32)."""
    storage = torch.zeros(2**21, dtype=torch.float16)._typed_storage()
    return save_checkpoint(model, path, anchors=Rebuild(storage, (2**31,), (0,)))


def test_a_constructor_bomb_is_refused(capsys, tmp_path, out):
    src = constructor_bomb(tmp_path / "bomb.pt")
    assert src.stat().st_size < 2000
    refused_by_cli(capsys, src, out, f"{src}: refused to load: the pickle calls models.common.Conv(16384, 16384, 3), "
                                     "a class constructor: a checkpoint rebuilds its layers without calling them (a "
                                     f"call could run code or allocate any amount of memory){NOT_RUN}")


def test_a_stride_0_bomb_is_refused(capsys, tmp_path, out, mini_model):
    src = stride_0_bomb(tmp_path / "bomb.pt", mini_model)
    refused_by_cli(capsys, src, out, f"{src}: refused to load: a tensor of size [2147483648], stride [0] has "
                                     "2,147,483,648 elements over a 2,097,152-element storage (repeated elements: "
                                     f"copying it would take 1,024x the memory the file holds){NOT_RUN}")


BOMB_PROBE = """
import resource, sys, time
from fxrewrite.cli import main
start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = main(["convert", sys.argv[1], "-o", sys.argv[2]])
print(code, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, time.perf_counter() - start)
"""


@pytest.mark.parametrize("bomb", ["constructor", "stride 0"])
def test_bombs_are_refused_quickly_without_allocating(tmp_path, mini_model, bomb):
    """Measured in a fresh process: peak memory grows by less than 100 MB (the bombs ask for 9.6 and 8.6 GB)."""
    src = constructor_bomb(tmp_path / "bomb.pt") if bomb == "constructor" else stride_0_bomb(tmp_path / "bomb.pt",
                                                                                               mini_model)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", BOMB_PROBE, str(src), str(tmp_path / "out.pt")], capture_output=True,
                          text=True, env=env, timeout=300)
    code, grown_mb, seconds = done.stdout.split()
    assert int(code) == 1 and "refused to load" in done.stderr and "Traceback" not in done.stderr
    assert int(grown_mb) < 100, f"peak memory grew by {grown_mb} MB"
    assert float(seconds) < 30
    assert not (tmp_path / "out.pt").exists()


def test_100000_nested_dicts_in_model_hyp_are_refused_without_a_traceback(capsys, tmp_path, out, mini_model):
    model = copy.deepcopy(mini_model)
    model.hyp = "PLACEHOLDER"
    src = save_checkpoint(model, tmp_path / "deep.pt")
    swapped(src, "PLACEHOLDER", nested_ordered_dicts(100_000))
    refused_by_cli(capsys, src, out, f"{src}: refused to load: model.hyp['a']['a']['a']['a']...['a']['a']['a'] "
                                     "(101 levels down) nests more than 100 levels deep (or contains itself); refused "
                                     f"before a recursive copy or print overflows the stack{NOT_RUN}")


def test_a_gadget_reached_through_the_models_code_is_called_what_it_is(capsys, tmp_path, out):
    call = op_global("models.common.os.system") + op_tuple(binunicode("true")) + b"R"
    src = torch_zip_with_pickle(tmp_path / "gadget.pt", in_checkpoint(call))
    refused_by_cli(capsys, src, out, f"{src}: refused to load: the pickle references models.common.os.system, which is "
                                     "not a block class of the model's code but something reached through it (a "
                                     f"function, a module or an attribute); refused as unsafe{NOT_RUN}")


def test_protocol_4_gadgets_through_the_models_code_are_refused_too(capsys, tmp_path, out):
    """STACK_GLOBAL('models.common', 'os.system'): a dotted name inside a module."""
    call = (b"\x80\x04" + binunicode("models.common") + binunicode("os.system") + b"\x93"
            + binunicode("true") + b"\x85R")
    src = torch_zip_with_pickle(tmp_path / "gadget.pt", b"\x80\x04}" + binunicode("model") + call + b"s.")
    code, _, err = run_cli(capsys, "convert", src, "-o", out / "gelan.pt")
    assert code == 1
    assert_one_line_error(err, f"{src}: refused to load: the pickle references models.common.os.system, which is not "
                               "a block class")


@pytest.fixture
def saved(tmp_path, mini_model):
    return save_checkpoint(mini_model, tmp_path / "last.pt"), mini_model


def test_a_flipped_byte_in_a_weight_is_refused_naming_the_tensor(capsys, out, saved):
    src, model = saved
    record = record_holding(src, model.model[1].conv.weight.half())
    raw = bytearray(src.read_bytes())
    raw[record_data_offset(src, record) + 5] ^= 0x10
    src.write_bytes(bytes(raw))
    refused_by_cli(capsys, src, out, f"{src}: truncated or corrupt zip archive (record {record!r} fails its CRC-32 "
                                     "check (its bytes are not the ones written), read for model.model.1.conv.weight)")


def test_a_record_shorter_than_its_tensor_is_refused_not_read_past(capsys, out, saved):
    """With mmap (as convert loads), the bytes after a short record used to become the tensor."""
    src, model = saved
    records = read_records(src)
    record = record_holding(src, model.model[1].conv.weight.half())
    records[record] = records[record][:-64]
    write_records(src, records)
    size = model.model[1].conv.weight.numel() * 2
    refused_by_cli(capsys, src, out, f"{src}: truncated or corrupt zip archive (record {record!r} holds {size - 64:,} "
                                     f"bytes where its tensor's storage needs {size:,}, read for "
                                     "model.model.1.conv.weight)")


def test_a_deflated_record_converts_with_the_weights_it_holds(capsys, tmp_path, out, saved):
    src, model = saved
    records = read_records(src)
    record = record_holding(src, model.model[1].conv.weight.half())
    write_records(src, records, compress={record: zipfile.ZIP_DEFLATED})
    code, _, err = run_cli(capsys, "convert", src, "-o", out / "gelan.pt")
    assert (code, err) == (0, "")
    converted = load_checkpoint(out / "gelan.pt", dtype=None).model.state_dict()
    training = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    origin = json.loads((out / "gelan.params.json").read_text())
    assert origin["model.0.conv.weight"] == "model.1.conv.weight"
    assert all(torch.equal(converted[new], training[old]) for new, old in origin.items())


def test_two_pickles_of_the_same_name_are_refused(capsys, out, saved):
    src, _ = saved
    records = list(read_records(src).items())
    name = next(n for n, _ in records if n.endswith("/data.pkl"))
    write_records(src, records + [(name, pickle.dumps({"model": None}, protocol=2))])
    refused_by_cli(capsys, src, out, f"{src}: refused: the archive holds 2 records named {name!r}; which one a reader "
                                     "takes is ambiguous")


def test_a_layer_overriding_its_forward_is_refused_naming_the_layer(capsys, tmp_path, out, mini_model):
    """A layer's instance dict holding ``forward = <an allowed callable>`` used to convert, verify as equal
    and go into OUT.pt; the layer would no longer run its class's code."""
    model = copy.deepcopy(mini_model)
    model.model[2].forward = model.model[1].forward_fuse  # another layer's method
    src = save_checkpoint(model, tmp_path / "override.pt")
    refused_by_cli(capsys, src, out, f"{src}: refused to load: layer model.model.2 (Conv): its attribute 'forward' "
                                     "holds getattr(Conv, 'forward_fuse'); a YOLOv9 checkpoint may only refer to the "
                                     "forward_fuse method of its layers and the forward function of their classes, "
                                     f"each on its own layer{NOT_RUN}")


def swapped(src: Path, text: str, opcodes: bytes) -> Path:
    """The checkpoint with the first pickled string ``text`` replaced by ``opcodes`` (pushing one object)."""
    records = read_records(src)
    name = next(n for n in records if n.endswith("/data.pkl"))
    records[name] = records[name].replace(binunicode(text), opcodes, 1)
    return write_records(src, records)


NOT_DATA = {  # where the pickle puts an allowed class or function instead of data, and the refusal
    "a class as a value in model.hyp": ("hyp", op_global("models.common.Conv"),
                                        "model.hyp is <class models.common.Conv (rebuilt without calling it)>, not "
                                        "data"),
    "a function as a value in model.hyp": ("hyp", op_global("collections.OrderedDict"),
                                           "model.hyp is <checked collections.OrderedDict>, not data"),
    "a class as a layer's type label": ("type", op_global("models.common.Conv"),
                                        "layer model.model.1 (Conv): its instance attribute 'type' overrides the type "
                                        "of its class (the layer would not run the code its class defines)"),
}


@pytest.mark.parametrize("case", list(NOT_DATA))
def test_what_is_not_data_is_refused(capsys, tmp_path, out, mini_model, case):
    where, opcodes, message = NOT_DATA[case]
    model = copy.deepcopy(mini_model)
    model.hyp = "PLACEHOLDER"
    src = save_checkpoint(model, tmp_path / "x.pt")
    swapped(src, "PLACEHOLDER" if where == "hyp" else "models.common.Conv", opcodes)
    refused_by_cli(capsys, src, out, f"{src}: refused to load: {message}{NOT_RUN}")


def inconsistent(model, case: str):
    bad = copy.deepcopy(model)
    if case == "'from' out of range":
        bad.model[5].f = 9
    elif case == "'from' pointing forward":
        bad.model[3].f = 4
    elif case == "'from' before the first layer":
        bad.model[2].f = -5
    elif case == "wrong index":
        bad.model[4].i = 7
    elif case == "config with fewer layers":
        bad.yaml["head"] = bad.yaml["head"][:-1]
    elif case == "output not kept":
        bad.save = [s for s in bad.save if s != 3]
    elif case == "config disagrees":
        bad.yaml["head"][0][0] = 4
    return bad


INCONSISTENT = {
    "'from' out of range": "layer 5 (Conv) reads layer 9 (its 'f'), which is not before it; a layer can only read the "
                           "outputs of earlier layers",
    "'from' pointing forward": "layer 3 (Conv) reads layer 4 (its 'f'), which is not before it; a layer can only "
                               "read the outputs of earlier layers",
    "'from' before the first layer": "layer 2 (Conv) reads layer -5 (its 'f'), which would be before the first layer",
    "wrong index": "layer 4 (Conv) says it is layer 7 (its 'i'); the model would keep the wrong outputs",
    "config with fewer layers": "its config (yaml) lists 7 layers but the model has 8; the config does not describe "
                                "these weights",
    "output not kept": "layer 5 (Conv) reads layer 3, whose output the model does not keep (it is not in model.save)",
    "config disagrees": "layer 5 (Conv) reads 3 (its 'f') but its config row says from 4",
}


@pytest.mark.parametrize("case", list(INCONSISTENT))
def test_an_inconsistent_layer_graph_is_explained(capsys, tmp_path, out, mini_model, case):
    """These used to fail with "list index out of range"."""
    src = save_checkpoint(inconsistent(mini_model, case), tmp_path / "bad.pt")
    refused_by_cli(capsys, src, out, f"{src}: the checkpoint's 'model' model is inconsistent: {INCONSISTENT[case]}")
