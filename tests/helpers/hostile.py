"""Shared by the hostile-input tests (tests/yolov9/test_hostile_*.py, tests/test_safe_load.py, tests/yolov9/test_differential_loading.py): a tiny PGI config, hostile checkpoints, and running the CLI."""
from __future__ import annotations

import math
import os
import pickle
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from fxrewrite.cli import main

# The smallest model the shipped rules convert: a Silence layer, two auxiliary layers, a DualDDetect.
MINI = {
    "nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0,
    "backbone": [
        [-1, 1, "Silence", []],
        [-1, 1, "Conv", [8, 3, 2]],
        [-1, 1, "Conv", [16, 3, 2]],
        [-1, 1, "Conv", [16, 3, 2]],  # 3 P3
        [-1, 1, "Conv", [16, 3, 2]],  # 4 P4
    ],
    "head": [
        [3, 1, "Conv", [16, 3, 1]],  # 5 aux
        [4, 1, "Conv", [16, 3, 1]],  # 6 aux
        [[5, 6, 3, 4], 1, "DualDDetect", ["nc"]],
    ],
}


def write_config(path: Path, config: dict = MINI) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, starts: str | None = None) -> None:
    """The CLI reported one line on stderr, no traceback."""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("fxrewrite: error: "), err
    assert "Traceback" not in err
    if starts is not None:
        assert err.startswith(f"fxrewrite: error: {starts}"), err


def listing(folder: Path) -> list[str]:
    """Every file below ``folder`` (temporary files included), relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------------------- hostile pickles
class SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class EvalPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return eval, (f"open({self.marker!r}, 'w').close()",)


class ExecPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


class PopenPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return subprocess.Popen, (["touch", self.marker],)


class CheckOutputPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return subprocess.check_output, (["touch", self.marker],)


class Unknown:  # an ordinary class that is simply not allowed in a checkpoint
    def __init__(self, marker=None):
        pass


class EvilModule(nn.Module):
    """A module whose unpickling would run a payload (its state holds one)."""

    def __init__(self, marker):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.payload = SystemPayload(marker)


def binunicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def torch_zip_with_pickle(path: Path, payload: bytes) -> Path:
    """A genuine torch.save zip whose data.pkl is replaced by ``payload``."""
    torch.save({}, path)
    with zipfile.ZipFile(path) as z:
        records = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in records.items():
            z.writestr(name, payload if name.endswith("/data.pkl") else data)
    return path


def handcrafted_payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """Pickles written by hand (no class needed to build them) and the global each must be refused for."""
    cmd = binunicode(f"touch {marker}")
    return {
        "GLOBAL os.system": (b"\x80\x02cos\nsystem\n" + cmd + b"\x85R.", "os.system"),
        "GLOBAL posix.system": (b"\x80\x02cposix\nsystem\n" + cmd + b"\x85R.", "posix.system"),
        "GLOBAL subprocess.getoutput": (b"\x80\x02csubprocess\ngetoutput\n" + cmd + b"\x85R.",
                                        "subprocess.getoutput"),
        # the module and name come from the memo (BINPUT / BINGET), as a pickler would write them
        "STACK_GLOBAL through the memo": (
            b"\x80\x04" + binunicode("os") + b"q\x00" + binunicode("system") + b"q\x01"
            + b"h\x00h\x01\x93" + cmd + b"\x85R.", "os.system"),
        # builtins.__import__('os') then getattr(..., 'system'): needs __import__
        "__import__ gadget": (
            b"\x80\x02c__builtin__\ngetattr\nc__builtin__\n__import__\n" + binunicode("os") + b"\x85R"
            + binunicode("system") + b"\x86R" + cmd + b"\x85R.", "builtins.__import__"),
        # INST opcode (protocol 0): instantiates a class with arguments
        "INST os.system": (b"(" + b"V" + f"touch {marker}".encode() + b"\nios\nsystem\n.", "os.system"),
    }


def reduce_payloads() -> dict[str, tuple[type, str]]:
    """Objects whose ``__reduce__`` runs a payload, and the global named in the refusal."""
    return {
        "os.system": (SystemPayload, f"{os.system.__module__}.system"),
        "builtins.eval": (EvalPayload, "builtins.eval"),
        "builtins.exec": (ExecPayload, "builtins.exec"),
        "subprocess.Popen": (PopenPayload, "subprocess.Popen"),
        "subprocess.check_output": (CheckOutputPayload, "subprocess.check_output"),
        "unknown class": (Unknown, f"{Unknown.__module__}.Unknown"),
    }


def payload_is_live(payload_cls, marker: Path) -> bool:
    """Sanity check of a payload itself: unpickled unsafely, it does create the marker."""
    if payload_cls is Unknown:
        return True
    pickle.loads(pickle.dumps(payload_cls(marker)))
    if payload_cls in (PopenPayload,):
        import time

        for _ in range(100):
            if marker.exists():
                break
            time.sleep(0.05)
    live = marker.exists()
    marker.unlink(missing_ok=True)
    return live


# ---------------------------------------------------------------------------- hand-written pickles
def op_global(dotted: str) -> bytes:
    """GLOBAL opcode for ``module.name`` (split at the last dot)."""
    module, _, name = dotted.rpartition(".")
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_int(n: int) -> bytes:
    """A non-negative int: BININT (4 bytes) or LONG1."""
    if 0 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def in_checkpoint(value: bytes, key: str = "model") -> bytes:
    """A protocol-2 pickle of ``{key: <value>}`` where ``value`` is opcodes that push one object."""
    return b"\x80\x02}" + binunicode(key) + value + b"s."


def nested_ordered_dicts(depth: int) -> bytes:
    """Opcodes pushing ``depth`` OrderedDicts nested in one another under key 'a' (no recursion needed to write)."""
    new = op_global("collections.OrderedDict") + b"r" + struct.pack("<I", 999_999) + b")R"
    again = b"j" + struct.pack("<I", 999_999) + b")R"
    return new + (binunicode("a") + again) * (depth - 1) + b"s" * (depth - 1)


# ---------------------------------------------------------------------------- archives
def read_records(path: Path) -> dict[str, bytes]:
    """Every record of a zip, by name, in order."""
    with zipfile.ZipFile(path) as z:
        return {info.filename: z.read(info) for info in z.infolist()}


def write_records(path: Path, records, compress: dict[str, int] | None = None) -> Path:
    """A zip of ``records`` (a dict, or (name, bytes) pairs to repeat a name), stored unless ``compress`` says."""
    import warnings

    items = records.items() if isinstance(records, dict) else records
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicated names: some tests want them
        with zipfile.ZipFile(path, "w") as z:
            for name, data in items:
                info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
                info.compress_type = (compress or {}).get(name, zipfile.ZIP_STORED)
                z.writestr(info, data)
    return path


def record_holding(path: Path, tensor: torch.Tensor) -> str:
    """The name of the storage record whose bytes are exactly ``tensor``'s."""
    want = tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()
    (name,) = [n for n, data in read_records(path).items() if "/data/" in n and data == want]
    return name


def record_data_offset(path: Path, name: str) -> int:
    """Where a record's data starts in the file (after its local header)."""
    with zipfile.ZipFile(path) as z:
        at = z.getinfo(name).header_offset
    raw = path.read_bytes()
    name_length, extra_length = struct.unpack_from("<HH", raw, at + 26)
    return at + 30 + name_length + extra_length


# ---------------------------------------------------------------------------- comparing loads
def assert_same(ours, theirs, where="root", pairs=None):
    """Recursive equality of two loaded objects (ours first): types, tensor bytes and layouts, layer state, which
    tensors share storage, bound methods."""
    pairs = {} if pairs is None else pairs
    assert type(ours) is type(theirs), where
    if isinstance(ours, torch.Tensor):
        assert (ours.dtype, ours.shape, ours.stride(), ours.storage_offset(), ours.requires_grad) == \
               (theirs.dtype, theirs.shape, theirs.stride(), theirs.storage_offset(), theirs.requires_grad), where
        assert torch.equal(ours.view(-1).view(torch.uint8) if ours.is_contiguous() and ours.numel() else ours,
                           theirs.view(-1).view(torch.uint8) if theirs.is_contiguous() and theirs.numel() else theirs), where
        # storages shared in one are shared in the other
        known = pairs.setdefault(ours.untyped_storage().data_ptr(), theirs.untyped_storage().data_ptr())
        assert known == theirs.untyped_storage().data_ptr() or ours.numel() == 0, where
    elif isinstance(ours, nn.Module):
        assert list(vars(ours)) == list(vars(theirs)), where
        for key in vars(ours):
            assert_same(vars(ours)[key], vars(theirs)[key], f"{where}.{key}", pairs)
    elif isinstance(ours, dict):
        assert list(ours) == list(theirs), where
        for key in ours:
            assert_same(ours[key], theirs[key], f"{where}[{key!r}]", pairs)
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{i}]", pairs)
    elif isinstance(ours, np.ndarray):
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), where
    elif hasattr(ours, "__self__") and hasattr(ours, "__func__"):  # a bound method
        assert ours.__func__ is theirs.__func__, where
    elif isinstance(ours, float) and math.isnan(ours):
        assert math.isnan(theirs), where
    else:
        assert ours == theirs, where
