"""The core safe loader (fxrewrite.serialization), on its own: YOLO-free files built here.

What it loads equals what plain ``torch.load`` loads; what it refuses, it refuses with one exact
message naming the file, the place in the file and the reason, before anything from the file runs,
and without allocating more than a small multiple of the file's size.
"""
from __future__ import annotations

import collections
import copy
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fxrewrite.serialization import AllowList, Checked, Inert, LoadError, RefusedGlobal, load, standard_globals
from fxrewrite.serialization.graph import MAX_NODES

from helpers.hostile import (assert_same, binunicode, in_checkpoint, nested_ordered_dicts, op_global, op_int, op_tuple,
                             read_records, record_data_offset, record_holding, torch_zip_with_pickle,
                             write_records)


class Block(nn.Module):
    """A layer with a fused form, like the YOLOv9 blocks."""

    def __init__(self, c: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.label = "block"

    def forward(self, x):
        return self.conv(x) + 1

    def forward_fuse(self, x):
        return self.conv(x)


class Head(Block):
    def __init__(self):
        super().__init__()
        self.detect = Block.forward  # its base class's function, kept as the segmentation heads keep theirs

    def forward(self, x):
        return x


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


CONV = _name(nn.Conv2d)
LAYERS = {_name(c): c for c in (nn.Conv2d, nn.BatchNorm2d, nn.SiLU, nn.Sequential, Block, Head)}
ALLOW = AllowList({**standard_globals(), **LAYERS}, bound_methods={"forward": "forward_fuse"},
                  class_functions={"detect": "forward"}, what="a test checkpoint")
NOT_RUN = "; nothing from the file was executed"


def refused(path, text: str) -> str:
    return f"{path}: refused to load: {text}{NOT_RUN}"


def load_error(path, **kwargs) -> str:
    with pytest.raises(LoadError) as info:
        load(path, ALLOW, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------- equal to torch.load
def fused_block() -> Block:
    block = Block()
    block.forward = block.forward_fuse
    return block


def samples() -> dict[str, object]:
    torch.manual_seed(0)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "every dtype": {str(d): torch.arange(6).to(d) for d in (
            torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16,
            torch.int32, torch.int64, torch.bool, torch.complex64)},
        "views sharing a storage": {"base": base, "row": base[1], "column": base[:, 2], "t": base.t()},
        "empty tensors": [torch.empty(0), torch.empty(3, 0), torch.zeros(())],
        "parameters": [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2), requires_grad=False)],
        "layers": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU()),
        "a fused layer": fused_block(),
        "a head keeping its base class's function": Head(),
        "plain data": {"none": None, "bools": [True, False], "big": 10**40, "float": 1.5, "nan": float("nan"),
                       "text": "héllo", "bytes": b"\x00\xff", "bytearray": bytearray(b"ab"), "complex": 1 + 2j,
                       "tuple": (1, (2, 3)), "set": {1, 2}, "frozenset": frozenset({"a"}),
                       "ordered": collections.OrderedDict(b=1, a=2), "nested": [[[{"k": [1]}]]]},
        "torch values": [torch.Size([2, 3]), torch.float16, torch.device("cpu")],
        "numpy": [np.array([0.25, 0.5]), np.float64(1.5), np.int64(3), np.dtype("float32"),
                  np.zeros((2, 3), dtype=np.int16)],
        "paths": [pathlib.PurePosixPath("/a/b"), pathlib.PurePath("c/d"), pathlib.PureWindowsPath("C:/x")],
    }


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("name", list(samples()))
def test_loads_what_plain_torch_load_loads(tmp_path, name, mmap):
    path = tmp_path / "x.pt"
    torch.save({"entry": samples()[name]}, path)
    theirs = torch.load(path, weights_only=False, map_location="cpu")
    ours = load(path, ALLOW, mmap=mmap)
    assert_same(ours, theirs)


def test_a_fused_layers_forward_is_its_own_bound_method(tmp_path):
    path = tmp_path / "fused.pt"
    torch.save({"model": fused_block()}, path)
    block = load(path, ALLOW)["model"]
    assert block.__dict__["forward"].__self__ is block and block.__dict__["forward"].__func__ is Block.forward_fuse
    x = torch.randn(1, 2, 3, 3)
    assert torch.equal(block(x), block.conv(x))


def test_mapped_tensors_are_copy_on_write(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(1000.0)}, path)
    before = path.read_bytes()
    loaded = load(path, ALLOW, mmap=True)
    loaded["w"].add_(1)
    assert path.read_bytes() == before
    assert torch.equal(load(path, ALLOW, mmap=True)["w"], torch.arange(1000.0))


# ---------------------------------------------------------------------------- names
def test_a_name_outside_the_allow_list_is_refused_by_name(tmp_path):
    path = torch_zip_with_pickle(tmp_path / "x.pt", in_checkpoint(op_global("os.system") + op_tuple(binunicode("true")) + b"R"))
    with pytest.raises(RefusedGlobal) as info:
        load(path, ALLOW)
    assert str(info.value) == refused(path, "the pickle references os.system, which is not allowed in a test checkpoint")
    assert info.value.name == "os.system" and b"system" in info.value.pickle


def test_python2_spellings_are_the_python3_names(tmp_path):
    """Protocol-2 pickles write ``__builtin__ set``; the allow-list is in Python 3 names."""
    path = torch_zip_with_pickle(tmp_path / "x.pt", in_checkpoint(
        b"c__builtin__\nset\n" + b"(]" + op_int(1) + b"at" + b"R"))
    assert load(path, ALLOW) == {"model": {1}}


def test_the_allow_list_is_data_checked_when_made():
    with pytest.raises(TypeError, match="allow-list: os.system is a builtin_function_or_method"):
        AllowList({"os.system": os.system})
    with pytest.raises(ValueError, match="is not a dotted name"):
        AllowList({"system": Checked("system", lambda context: None)})
    wider = ALLOW.with_globals({"pathlib.PurePath": Inert(pathlib.PurePath)})
    assert "pathlib.PurePath" in wider.names() and dict(wider.bound_methods) == {"forward": "forward_fuse"}


# ---------------------------------------------------------------------------- no calls, no changes
CONSTRUCTOR_REFUSED = (f"the pickle calls {CONV}(16384, 16384, 3), a class constructor: a checkpoint rebuilds its "
                       "layers without calling them (a call could run code or allocate any amount of memory)")
CALLS = {  # opcodes that would call or build an allowed layer class with arguments, and the refusal
    "REDUCE": (op_global(CONV) + op_tuple(op_int(16384), op_int(16384), op_int(3)) + b"R", CONSTRUCTOR_REFUSED),
    "OBJ": (b"(" + op_global(CONV) + op_int(16384) + op_int(16384) + op_int(3) + b"o", CONSTRUCTOR_REFUSED),
    "INST": (b"(" + op_int(16384) + op_int(16384) + op_int(3) + b"i" + CONV.rpartition(".")[0].encode() + b"\nConv2d\n",
             CONSTRUCTOR_REFUSED),
    "NEWOBJ with arguments": (op_global(CONV) + op_tuple(op_int(16384), op_int(16384), op_int(3)) + b"\x81",
                              f"the pickle creates {CONV}(16384, 16384, 3) with arguments; a checkpoint rebuilds its "
                              "layers from their saved state alone"),
    "NEWOBJ_EX with keywords": (op_global(CONV) + b")}" + binunicode("in_channels") + op_int(16384) + b"s\x92",
                                f"the pickle creates {CONV}(in_channels=16384) with arguments; a checkpoint rebuilds "
                                "its layers from their saved state alone"),
}


@pytest.mark.parametrize("how", list(CALLS))
def test_an_allowed_layer_class_is_never_called(tmp_path, how):
    """Real checkpoints rebuild layers with NEWOBJ (``cls.__new__(cls)``) and BUILD; a pickle that calls the class
    -- through any opcode -- is refused before the call, so nothing is allocated."""
    opcodes, message = CALLS[how]
    path = torch_zip_with_pickle(tmp_path / "x.pt", in_checkpoint(opcodes))
    assert load_error(path) == refused(path, message)


def test_newobj_without_arguments_rebuilds_the_layer_without_init(tmp_path):
    path = torch_zip_with_pickle(tmp_path / "x.pt", in_checkpoint(
        op_global(_name(nn.SiLU)) + b")\x81" + b"}" + binunicode("inplace") + b"\x88s" + b"b"))
    assert load_error(path) == refused(path, "layer model (SiLU) lacks _buffers, _modules, _parameters, training: "
                                             "not the saved state of a layer")
    silu = pickle.loads(pickle.dumps(nn.SiLU(inplace=True), protocol=2))  # what a real file holds loads fine
    path = tmp_path / "silu.pt"
    torch.save({"model": silu}, path)
    assert load(path, ALLOW)["model"].inplace is True


BUILDS = {  # BUILD on objects the allow-list hands out, and the refusal
    "a checked function": (op_global("collections.OrderedDict") + b"}" + binunicode("x") + op_int(1) + b"sb",
                           "the pickle tries to change <checked collections.OrderedDict>"),
    "a layer class (slot state)": (op_global(CONV) + b"N}" + binunicode("x") + op_int(1) + b"s\x86b",
                                   f"the pickle tries to change the class {CONV}"),
    "a storage type": (op_global("torch.FloatStorage") + b"}" + binunicode("x") + op_int(1) + b"sb",
                       "the pickle tries to change <storage type torch.float32>"),
    "a getattr function": (op_global("builtins.getattr") + b"}" + binunicode("x") + op_int(1) + b"sb",
                           "the pickle tries to change <checked builtins.getattr>"),
}


@pytest.mark.parametrize("target", list(BUILDS))
def test_build_cannot_change_what_the_allow_list_hands_out(tmp_path, target):
    opcodes, message = BUILDS[target]
    path = torch_zip_with_pickle(tmp_path / "x.pt", in_checkpoint(opcodes))
    assert load_error(path) == refused(path, message)
    path2 = tmp_path / "y.pt"
    torch.save({"model": collections.OrderedDict(a=1)}, path2)  # and the next load is unaffected
    assert load(path2, ALLOW) == {"model": collections.OrderedDict(a=1)}


def getattr_pickle(target: bytes, name: str) -> bytes:
    return op_global("builtins.getattr") + op_tuple(target, binunicode(name)) + b"R"


def test_getattr_reaches_only_the_permitted_methods(tmp_path):
    rule = "the forward_fuse method of its layers and the forward function of their classes"
    for target, name, shown in [(op_global(CONV) + b")\x81", "register_forward_hook", "Conv2d"),
                                (op_global(CONV), "__init__", "Conv2d"),
                                (op_global("collections.OrderedDict"), "forward", "functools.partial")]:
        path = torch_zip_with_pickle(tmp_path / "x.pt", in_checkpoint(getattr_pickle(target, name)))
        message = load_error(path)
        assert message.startswith(f"{path}: refused to load: refused getattr("), message
        assert message.endswith(f"{name!r}): a test checkpoint may only refer to {rule}{NOT_RUN}"), message


def test_a_permitted_method_cannot_be_called_while_loading(tmp_path):
    """``getattr(block, 'forward_fuse')(tensor)`` would run the layer on file data during the load."""
    block = op_global(_name(Block)) + b")\x81"
    call = getattr_pickle(block, "forward_fuse") + op_tuple(op_int(1)) + b"R"
    path = torch_zip_with_pickle(tmp_path / "x.pt", in_checkpoint(call))
    assert load_error(path) == refused(path, "the pickle calls getattr(Block, 'forward_fuse') while loading; a "
                                             "checkpoint may only keep such a reference")


def method_of_another_layer():
    a, b = Block(), Block()
    a.forward = b.forward_fuse  # bound to another layer
    return nn.Sequential(a, b), "model.0 (Block): its attribute 'forward' holds getattr(Block, 'forward_fuse')"


def function_of_another_class():
    head = Head()
    head.detect = nn.Conv2d.forward  # a Head is no Conv2d
    return head, "model (Head): its attribute 'detect' holds getattr(Conv2d, 'forward')"


@pytest.mark.parametrize("make", [method_of_another_layer, function_of_another_class])
def test_a_permitted_reference_must_be_the_layers_own(tmp_path, make):
    model, problem = make()
    path = tmp_path / "x.pt"
    torch.save({"model": model}, path)
    assert load_error(path) == refused(path, f"layer {problem}; a test checkpoint may only refer to the forward_fuse "
                                             "method of its layers and the forward function of their classes, each "
                                             "on its own layer")


# ---------------------------------------------------------------------------- data only
def test_an_instance_attribute_may_not_override_a_method(tmp_path):
    block = Block()
    block.forward = 5
    path = tmp_path / "x.pt"
    torch.save({"model": block}, path)
    assert load_error(path) == refused(path, "layer model (Block): its instance attribute 'forward' overrides the "
                                             "forward of its class (the layer would not run the code its class "
                                             "defines)")


def layer_with(change) -> Block:
    block = Block()
    change(block)
    return block


LAYER_STATE = {
    "a forward hook": (lambda b: b._forward_hooks.__setitem__(0, 1),
                       "layer model (Block) has hooks in _forward_hooks; hooks are code, not data"),
    "a plain tensor as a parameter": (lambda b: b._parameters.__setitem__("w", torch.zeros(1)),
                                      "layer model (Block): 'w' in its _parameters is a Tensor, not a Parameter"),
    "a number as a child layer": (lambda b: b._modules.__setitem__("c", 3),
                                  "layer model (Block): 'c' in its _modules is a int, not a layer"),
    "a training flag that is text": (lambda b: b.__dict__.__setitem__("training", "yes"),
                                     "layer model (Block): its training flag is a str, not a bool"),
}


@pytest.mark.parametrize("case", list(LAYER_STATE))
def test_a_layers_own_state_must_be_what_nn_module_keeps(tmp_path, case):
    change, message = LAYER_STATE[case]
    path = tmp_path / "x.pt"
    torch.save({"model": layer_with(change)}, path)
    assert load_error(path) == refused(path, message)


NOT_DATA = {
    "a checked function": (op_global("collections.OrderedDict"), "model is <checked collections.OrderedDict>, not data"),
    "a layer class": (op_global(CONV), f"model is <class {CONV} (rebuilt without calling it)>, not data"),
    "a storage type": (op_global("torch.HalfStorage"), "model is <storage type torch.float16>, not data"),
}


@pytest.mark.parametrize("case", list(NOT_DATA))
def test_only_data_comes_back(tmp_path, case):
    opcodes, message = NOT_DATA[case]
    path = torch_zip_with_pickle(tmp_path / "x.pt", in_checkpoint(opcodes))
    assert load_error(path) == refused(path, message)


def test_a_bare_storage_or_an_object_array_is_not_data(tmp_path):
    path = tmp_path / "s.pt"
    torch.save({"opt": [torch.zeros(3)._typed_storage()]}, path)
    assert load_error(path) == refused(path, "opt[0] is <storage s/data/0 (3 x torch.float32)>, not data")
    path = tmp_path / "o.pt"
    torch.save({"opt": np.array([1, "a"], dtype=object)}, path)
    message = load_error(path)
    assert message.startswith(f"{path}: refused to load: ") and "object" in message


# ---------------------------------------------------------------------------- tensors inside their storage
class Rebuild:
    """Pickles as a tensor view of ``storage`` with any size and stride (what a crafted file can say)."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def test_a_stride_0_view_is_refused_before_anything_is_copied(tmp_path):
    storage = torch.zeros(2**20)._typed_storage()  # 4 MB
    path = tmp_path / "bomb.pt"
    torch.save({"model": Rebuild(storage, 0, (2**31,), (0,))}, path)  # would copy into 8 GB
    expected = refused(path, "a tensor of size [2147483648], stride [0] has 2,147,483,648 elements over a "
                             "1,048,576-element storage (repeated elements: copying it would take 2,048x the memory "
                             "the file holds)")
    assert load_error(path) == expected
    assert load_error(path, mmap=True) == expected


@pytest.mark.parametrize("offset, size, stride, reach", [(0, (5,), (1,), 5), (3, (2,), (1,), 5), (0, (2, 3), (3, 1), 6)])
def test_a_view_reaching_outside_its_storage_is_refused(tmp_path, offset, size, stride, reach):
    storage = torch.zeros(4)._typed_storage()
    path = tmp_path / "x.pt"
    torch.save({"model": Rebuild(storage, offset, size, stride)}, path)
    assert load_error(path) == refused(path, f"a tensor of size {list(size)}, stride {list(stride)} at offset "
                                             f"{offset:,} reaches element {reach:,} of its 4-element storage")


def test_views_may_not_multiply_the_files_tensor_bytes(tmp_path):
    storage = torch.zeros(2**20)._typed_storage()  # 4 MiB; three full views = 12 MiB > 2 x 4 MiB + 1 MiB
    path = tmp_path / "x.pt"
    torch.save({"model": [Rebuild(storage, 0, (2**20,), (1,)) for _ in range(3)]}, path)
    assert load_error(path) == refused(path, "its tensors view 12,582,912 bytes of the 4,194,304 bytes of tensor data "
                                             "the file holds (overlapping views: copying them would take far more "
                                             "memory than the file's size)")
    torch.save({"model": [Rebuild(storage, 0, (2**20,), (1,)) for _ in range(2)]}, path)
    assert len(load(path, ALLOW)["model"]) == 2


# ---------------------------------------------------------------------------- records: the bytes written
@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    path = tmp_path / "c.pt"
    torch.save({"model": layer, "epoch": 3}, path)
    return path, layer


@pytest.mark.parametrize("mmap", [False, True])
def test_a_flipped_byte_in_a_tensor_is_refused_naming_the_tensor_and_its_record(saved, mmap):
    path, layer = saved
    record = record_holding(path, layer[0].weight)
    raw = bytearray(path.read_bytes())
    raw[record_data_offset(path, record) + 17] ^= 0x01
    path.write_bytes(bytes(raw))
    assert load_error(path, mmap=mmap) == (f"{path}: truncated or corrupt zip archive (record {record!r} fails its "
                                           "CRC-32 check (its bytes are not the ones written), read for "
                                           "model.0.weight)")
    assert torch.load(path, weights_only=False)  # plain torch.load takes the damaged bytes without a word


@pytest.mark.parametrize("mmap", [False, True])
def test_a_short_record_is_refused_not_read_past(saved, mmap):
    path, layer = saved
    records = read_records(path)
    record = record_holding(path, layer[0].weight)
    records[record] = records[record][:-8]
    write_records(path, records)
    assert load_error(path, mmap=mmap) == (f"{path}: truncated or corrupt zip archive (record {record!r} holds 856 "
                                           "bytes where its tensor's storage needs 864, read for model.0.weight)")


def test_a_missing_record_is_refused(saved):
    path, layer = saved
    records = read_records(path)
    record = record_holding(path, layer[0].bias)
    del records[record]
    write_records(path, records)
    assert load_error(path) == (f"{path}: truncated or corrupt zip archive (record {record!r} is missing from the "
                                "archive, read for model.0.bias)")


@pytest.mark.parametrize("which", ["a tensor record", "data.pkl", "every record"])
def test_deflated_records_are_inflated_and_checked(saved, which):
    path, layer = saved
    records = read_records(path)
    names = {"a tensor record": [record_holding(path, layer[0].weight)],
             "data.pkl": [n for n in records if n.endswith("data.pkl")], "every record": list(records)}[which]
    write_records(path, records, compress={n: zipfile.ZIP_DEFLATED for n in names})
    with zipfile.ZipFile(path) as z:
        assert all(z.getinfo(n).compress_type == zipfile.ZIP_DEFLATED for n in names)
    assert_same(load(path, ALLOW), torch.load(path, weights_only=False))
    assert_same(load(path, ALLOW, mmap=True), torch.load(path, weights_only=False))


def test_other_compression_methods_are_refused(saved):
    path, layer = saved
    records = read_records(path)
    record = record_holding(path, layer[0].weight)
    write_records(path, records, compress={record: zipfile.ZIP_BZIP2})
    assert load_error(path) == (f"{path}: truncated or corrupt zip archive (record {record!r} uses compression method "
                                "12 (bzip2), which torch never writes nor reads, read for model.0.weight)")


def test_duplicated_records_are_ambiguous(saved):
    path, _ = saved
    records = list(read_records(path).items())
    pickle_entry = [r for r in records if r[0].endswith("/data.pkl")][0]
    write_records(path, records + [(pickle_entry[0], pickle.dumps({"model": None}, protocol=2))])
    assert load_error(path) == (f"{path}: refused: the archive holds 2 records named {pickle_entry[0]!r}; which one a "
                                "reader takes is ambiguous")
    records = read_records(path)
    write_records(path, {**records, "other/data.pkl": pickle.dumps({}, protocol=2)})
    assert load_error(path) == (f"{path}: refused: the archive holds 2 pickles (c/data.pkl, other/data.pkl); which "
                                "one a reader takes is ambiguous")


def test_overlapping_records_are_refused(saved):
    path, layer = saved
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    # make the second record's directory entry point at the first record's local header
    central = raw.index(b"PK\x01\x02")
    second = raw.index(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", raw, second + 42, infos[0].header_offset)
    path.write_bytes(bytes(raw))
    assert load_error(path) == (f"{path}: truncated or corrupt zip archive (record {infos[1].filename!r}: its local "
                                "header names another file)")


def test_big_endian_files_are_refused(saved):
    path, _ = saved
    records = read_records(path)
    records["c/byteorder"] = b"big"
    write_records(path, records)
    assert load_error(path) == (f"{path}: refused: the tensors are stored big-endian, which fxrewrite does not "
                                "convert; re-save the checkpoint on a little-endian machine")


# ---------------------------------------------------------------------------- nesting and expansion
def test_100000_nested_dicts_are_refused_without_a_recursion_error(tmp_path):
    path = torch_zip_with_pickle(tmp_path / "deep.pt", in_checkpoint(nested_ordered_dicts(100_000), "hyp"))
    assert load_error(path) == refused(path, "hyp['a']['a']['a']['a']['a']...['a']['a']['a'] (101 levels down) nests "
                                             "more than 100 levels deep (or contains itself); refused before a "
                                             "recursive copy or print overflows the stack")


def test_what_loads_can_be_deep_copied(tmp_path):
    path = torch_zip_with_pickle(tmp_path / "deep.pt", in_checkpoint(nested_ordered_dicts(99), "hyp"))
    copy.deepcopy(load(path, ALLOW))  # the deepest file that loads does not overflow a recursive copy


def test_a_list_containing_itself_is_refused(tmp_path):
    path = torch_zip_with_pickle(tmp_path / "loop.pt", in_checkpoint(b"]q\x00h\x00a"))
    assert load_error(path).endswith("nests more than 100 levels deep (or contains itself); refused before a "
                                     "recursive copy or print overflows the stack" + NOT_RUN)


def test_shared_lists_cannot_expand_into_billions(tmp_path):
    """60 levels of a list holding the level below twice: 70 bytes of pickle, 2**60 paths."""
    levels = [b"(h" + bytes([i]) + b"h" + bytes([i]) + b"lq" + bytes([i + 1]) for i in range(60)]
    opcodes = b"]q\x000" + b"0".join(levels)  # each list is memoized, then popped once the next one holds it
    path = torch_zip_with_pickle(tmp_path / "dag.pt", in_checkpoint(opcodes))
    message = load_error(path)
    assert message.startswith(f"{path}: refused to load: ")
    assert message.endswith(f"the file holds more than {MAX_NODES:,} objects counted along every path (shared "
                            "containers repeated over and over?)" + NOT_RUN)


# ---------------------------------------------------------------------------- memory
MEMORY_PROBE = textwrap.dedent("""
    import resource, sys, time
    from fxrewrite.serialization import LoadError, load
    sys.path.insert(0, {tests!r})
    from test_safe_load import ALLOW
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        load(sys.argv[1], ALLOW, memory_budget={budget})
        print("loaded")
    except LoadError as error:
        print(error)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, time.perf_counter() - start)
""")


def probe(path: Path, budget: int | None = None) -> tuple[str, int, float]:
    code = MEMORY_PROBE.format(tests=str(Path(__file__).parent), budget=budget)
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    message, numbers = done.stdout.strip().rsplit("\n", 1)
    grown, seconds = numbers.split()
    return message, int(grown), float(seconds)


def test_a_pickle_of_empty_sets_stops_at_the_memory_budget(tmp_path):
    """20 MB of one-byte EMPTY_SET opcodes would make 20 million sets (over 4 GB)."""
    path = torch_zip_with_pickle(tmp_path / "sets.pt", b"\x80\x02" + b"\x8f" * 20_000_000 + b".")
    budget = 200 << 20
    message, grown_mb, _ = probe(path, budget)
    assert message.startswith(f"{path}: refused to load: loading it took ")
    assert message.endswith(f"more than its budget of {budget:,} (the larger of 512 MiB and 3x the file's size; a "
                            "memory bomb?)" + NOT_RUN)
    assert grown_mb < 400, f"peak memory grew by {grown_mb} MB"
