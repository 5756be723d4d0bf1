"""A ``torch.save`` zip archive, opened without trusting it.

``torch.save`` writes a zip of *stored* (uncompressed) records under one folder:
``<name>/data.pkl`` (the pickle), ``<name>/data/<key>`` (one record per tensor
storage) and a few small ones (``byteorder``, ``version`` ...). torch's own reader
checks little of it: no CRC-32, no compression method, no record size against
the tensor that uses it. :class:`TorchArchive` checks, before anything is
unpickled, that the file is such an archive (and says what it is when it is
not: a legacy torch file, a plain pickle, a truncated zip ...), that no two
records share a name and there is exactly one ``data.pkl``, that every record
lies inside the file without overlapping another, that the declared sizes
are not a zip bomb, and that the small records besides the tensors
(``byteorder``, ``version`` ...) are intact. When a record is read, its compression method (stored;
deflate is inflated within its declared size; anything else is refused), its
size and its CRC-32 are checked before its bytes are handed out.

Storages are copied into memory, or with ``mmap=True`` mapped copy-on-write
from the file (writing to such a tensor never changes the file).

>>> import os, tempfile, torch
>>> path = os.path.join(tempfile.mkdtemp(), "t.pt")
>>> torch.save({"w": torch.arange(3.0)}, path)
>>> with TorchArchive(path) as archive:
...     storage = archive.storage("0", 12)
>>> archive.prefix, storage.nbytes()
('t/', 12)
"""
from __future__ import annotations

import collections
import mmap as _mmap
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

from .errors import LoadError

__all__ = ["TorchArchive", "Record", "RecordProblem", "MAX_EXPANSION_BYTES", "DEFAULT_MAX_PICKLE_BYTES"]

PathLike = Union[str, "os.PathLike[str]"]

# How torch wrote files before the zip format (torch < 1.6): a pickled magic number first.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # signature ... file name length, extra field length
_LOCAL_SIGNATURE = 0x04034B50
STORED, DEFLATED = 0, 8
_METHOD_NAMES = {1: "shrink", 6: "implode", 9: "deflate64", 12: "bzip2", 14: "lzma", 93: "zstd", 95: "xz", 98: "ppmd"}
#: How much more than 4x the file's size its records may declare (torch.save stores records uncompressed).
MAX_EXPANSION_BYTES = 1 << 30
#: Largest data.pkl record read by default (tensor data lives in other records; a yolov9-e training
#: checkpoint's pickle is about 1.2 MB).
DEFAULT_MAX_PICKLE_BYTES = 100_000_000
_BAD_CRC = "fails its CRC-32 check (its bytes are not the ones written)"
_SMALL_RECORD = 1 << 16  # metadata records (byteorder, version, alignment ...) are checked when the file is opened
_READ_CHUNK = 1 << 30  # one preadv call reads at most this much (Linux caps a single read near 2 GiB)


class RecordProblem(Exception):
    """A record cannot give the bytes asked of it. ``record`` names it; ``problem`` says why."""

    def __init__(self, record: str, problem: str):
        super().__init__(f"record {record!r} {problem}")
        self.record = record
        self.problem = problem


@dataclass(frozen=True)
class Record:
    """Where one record's bytes are, and what the archive's directory says about them."""

    name: str
    start: int  # offset of its (possibly compressed) data in the file
    size: int  # uncompressed size
    stored_size: int  # size in the file
    method: int  # 0 stored, 8 deflate
    crc: int


def check_container(path: Path, shown: str) -> None:
    """File-level problems, decided from the first bytes alone (no zip parsing yet)."""
    if not path.exists():
        raise LoadError(f"{shown}: no such file")
    if path.is_dir():
        raise LoadError(f"{shown}: is a directory, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise LoadError(f"{shown}: file is empty (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
        if zipfile.is_zipfile(f):
            return
    if head.startswith(b"PK\x03\x04"):
        raise LoadError(f"{shown}: truncated or corrupt zip archive (no end-of-archive record)")
    if head == _LEGACY_MAGIC:
        raise LoadError(f"{shown}: legacy (pre-1.6, non-zip) torch file format; it cannot be loaded safely, "
                        "only torch.save zip checkpoints are supported")
    if head[:1] == b"\x80":
        raise LoadError(f"{shown}: a plain pickle file, not a torch.save checkpoint; refused (nothing was executed)")
    raise LoadError(f"{shown}: not a torch checkpoint (not a zip archive)")


class TorchArchive:
    """An open ``torch.save`` archive whose directory was checked; see the module docstring.

    ``shown`` names the file in messages (default: ``path`` as given). ``mmap``
    decides how :meth:`storage` hands out tensor data: copied (False) or mapped
    copy-on-write (True). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: PathLike, *, shown: str | None = None, mmap: bool = False,
                 max_pickle_bytes: int = DEFAULT_MAX_PICKLE_BYTES):
        self.path = Path(os.fspath(path))
        self.shown = os.fspath(path) if shown is None else shown
        self.mapped = mmap
        check_container(self.path, self.shown)
        self._file = open(self.path, "rb")
        self._map: _mmap.mmap | None = None
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            self._map = _mmap.mmap(self._file.fileno(), 0, access=_mmap.ACCESS_COPY if mmap else _mmap.ACCESS_READ)
            self.records, self.prefix = self._read_directory(max_pickle_bytes)
            self._check_byte_order()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ directory
    def _corrupt(self, detail: str) -> LoadError:
        return LoadError(f"{self.shown}: truncated or corrupt zip archive ({detail})")

    def _read_directory(self, max_pickle_bytes: int) -> tuple[dict[str, Record], str]:
        try:
            with zipfile.ZipFile(self._file) as archive:  # a file object passed in stays open
                infos = archive.infolist()
                directory_start = archive.start_dir
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
            raise self._corrupt(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - damaged headers: a name that is not UTF-8, a bad field...
            raise self._corrupt(f"{type(exc).__name__}: {exc}") from None
        shown = self.shown
        counts = collections.Counter(info.filename for info in infos)
        twice = sorted(name for name, n in counts.items() if n > 1)
        if twice:
            raise LoadError(f"{shown}: refused: the archive holds {counts[twice[0]]} records named {twice[0]!r}; "
                            "which one a reader takes is ambiguous")
        pickles = sorted(n for n in counts if n.count("/") == 1 and n.endswith("/data.pkl"))
        if not pickles:
            if any(n.endswith("/constants.pkl") for n in counts):
                raise LoadError(f"{shown}: a TorchScript archive, not a torch.save checkpoint")
            raise LoadError(f"{shown}: a zip archive but not a torch checkpoint (no data.pkl record)")
        if len(pickles) > 1:
            raise LoadError(f"{shown}: refused: the archive holds {len(pickles)} pickles ({', '.join(pickles)}); "
                            "which one a reader takes is ambiguous")
        declared = sum(info.file_size for info in infos)
        if declared > 4 * self.size + MAX_EXPANSION_BYTES:
            raise LoadError(f"{shown}: refused: its records would expand to {declared:,} bytes from a "
                            f"{self.size:,}-byte file (a zip bomb?)")
        pickle_size = next(i.file_size for i in infos if i.filename == pickles[0])
        if pickle_size > max_pickle_bytes:
            raise LoadError(f"{shown}: refused: its data.pkl record is {pickle_size:,} bytes, more than the "
                            f"{max_pickle_bytes:,} a model's pickle takes (tensors are stored apart)")
        records = {info.filename: self._locate(info, directory_start) for info in infos}
        ends = sorted((info.header_offset, records[info.filename].start + info.compress_size, info.filename)
                      for info in infos)
        for (_, end, name), (start, _, following) in zip(ends, ends[1:]):
            if end > start:
                raise self._corrupt(f"records {name!r} and {following!r} overlap")
        prefix = pickles[0][: -len("data.pkl")]
        for name, record in records.items():  # the small records torch reads besides the tensors: intact too
            if not name.startswith(f"{prefix}data/") and name != pickles[0] and record.size <= _SMALL_RECORD:
                try:
                    self._payload(record)
                except RecordProblem as exc:
                    raise self._corrupt(str(exc)) from None
        return records, prefix

    def _locate(self, info: zipfile.ZipInfo, directory_start: int) -> Record:
        """The record's data offset, from its local header, which must agree with the directory."""
        name, at = info.filename, info.header_offset
        if at < 0 or at + _LOCAL_HEADER.size > directory_start:
            raise self._corrupt(f"record {name!r} starts outside the archive")
        signature, _, flags, method, _, _, _, _, _, name_length, extra_length = _LOCAL_HEADER.unpack_from(self._map, at)
        if signature != _LOCAL_SIGNATURE:
            raise self._corrupt(f"record {name!r} has no local header where the directory says")
        start = at + _LOCAL_HEADER.size + name_length + extra_length
        local_name = self._map[at + _LOCAL_HEADER.size: at + _LOCAL_HEADER.size + name_length]
        expected = name.encode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace")
        if local_name != expected and local_name != name.encode("utf-8", "replace"):
            raise self._corrupt(f"record {name!r}: its local header names another file")
        if method != info.compress_type:
            raise self._corrupt(f"record {name!r}: its local header and the directory disagree on its compression")
        if start + info.compress_size > directory_start:
            raise self._corrupt(f"record {name!r} runs past the end of the archive's data")
        if info.compress_type == STORED and info.compress_size != info.file_size:
            raise self._corrupt(f"record {name!r} is stored uncompressed but declares {info.file_size:,} bytes "
                                f"and holds {info.compress_size:,}")
        return Record(name, start, info.file_size, info.compress_size, info.compress_type, info.CRC)

    def _check_byte_order(self) -> None:
        record = self.records.get(self.prefix + "byteorder")
        if record is None:
            return  # files from before torch 2.1: little-endian, like every machine torch runs on today
        try:
            order = self._payload(record)
        except RecordProblem as exc:
            raise self._corrupt(str(exc)) from None
        if order == b"big":
            raise LoadError(f"{self.shown}: refused: the tensors are stored big-endian, which fxrewrite does not "
                            "convert; re-save the checkpoint on a little-endian machine")
        if order != b"little":
            raise self._corrupt(f"record {record.name!r} names an unknown byte order {order[:20]!r}")

    # ------------------------------------------------------------------ reading
    def _payload(self, record: Record) -> bytes:
        """The record's bytes (a copy), decompressed and CRC-checked."""
        assert self._map is not None
        whole = memoryview(self._map)
        raw = whole[record.start: record.start + record.stored_size]
        try:  # the views are released on every path: a mapping cannot close while one is alive
            if record.method == STORED:
                data = bytes(raw)
            elif record.method == DEFLATED:
                data = _inflate(raw, record)
            else:
                method = _METHOD_NAMES.get(record.method, "unknown")
                raise RecordProblem(record.name, f"uses compression method {record.method} ({method}), which "
                                                 "torch never writes nor reads")
        finally:
            raw.release()
            whole.release()
        if zlib.crc32(data) != record.crc:
            raise RecordProblem(record.name, _BAD_CRC)
        return data

    def pickle_bytes(self) -> bytes:
        """The ``data.pkl`` record, checked."""
        record = self.records[self.prefix + "data.pkl"]
        try:
            return self._payload(record)
        except RecordProblem as exc:
            if exc.problem == _BAD_CRC:
                raise self._corrupt(f"Bad CRC-32 for file {record.name!r}") from None
            raise self._corrupt(str(exc)) from None

    def storage(self, key: str, nbytes: int) -> torch.UntypedStorage:
        """The bytes of storage record ``data/<key>``, which must hold exactly ``nbytes``.

        Raises :class:`RecordProblem` (the record is missing, of another size,
        compressed in a way torch does not write, or damaged) before any tensor
        can see the bytes.
        """
        name = f"{self.prefix}data/{key}"
        record = self.records.get(name)
        if record is None:
            raise RecordProblem(name, "is missing from the archive")
        if record.size != nbytes:
            raise RecordProblem(name, f"holds {record.size:,} bytes where its tensor's storage needs {nbytes:,}")
        if record.method == STORED and nbytes and self.mapped:
            whole = memoryview(self._map)
            data = whole[record.start: record.start + nbytes]
            crc = zlib.crc32(data)
            data.release()
            whole.release()
            if crc != record.crc:  # checked before any tensor can see the mapping
                raise RecordProblem(name, _BAD_CRC)
            view = torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes, offset=record.start)
        elif record.method == STORED and nbytes:
            view, data = _new_bytes(nbytes)
            _read_exactly(self._file, data, record.start, name)
            crc = zlib.crc32(data)
        else:
            payload = self._payload(record)  # compressed or empty: checked while decompressing
            view = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
            crc = record.crc
        if crc != record.crc:
            raise RecordProblem(name, _BAD_CRC)
        return view.untyped_storage()

    def close(self) -> None:
        if self._map is not None and not self.mapped:
            self._map.close()  # mapped storages keep the mapping alive; it goes with the last of them
        self._map = None
        self._file.close()

    def __enter__(self) -> "TorchArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _inflate(raw: memoryview, record: Record) -> bytes:
    """Decompress a deflate record into at most its declared size (a bomb stops there)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(raw, record.size) if record.size else inflater.decompress(raw, 1)
    except zlib.error as exc:
        raise RecordProblem(record.name, f"is not a valid deflate stream ({exc})") from None
    if len(data) != record.size or inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
        raise RecordProblem(record.name, f"does not inflate to its declared {record.size:,} bytes")
    return data


def _new_bytes(nbytes: int) -> tuple[torch.Tensor, memoryview]:
    """A new uint8 tensor (torch's aligned allocation) and a writable view of its memory."""
    tensor = torch.empty(nbytes, dtype=torch.uint8)
    try:
        return tensor, memoryview(tensor.numpy())
    except RuntimeError:  # torch built without numpy: a bytearray, shared with the tensor
        buffer = bytearray(nbytes)
        return torch.frombuffer(buffer, dtype=torch.uint8), memoryview(buffer)


def _read_exactly(file, into: memoryview, offset: int, name: str) -> None:
    """Fill ``into`` from ``offset`` (one ``preadv`` per GiB where the OS has it: no seek, no Python loop)."""
    done = 0
    while done < len(into):
        part = into[done: done + _READ_CHUNK]
        if hasattr(os, "preadv"):
            n = os.preadv(file.fileno(), [part], offset + done)
        else:  # pragma: no cover - Windows
            file.seek(offset + done)
            n = file.readinto(part)
        if not n:
            raise RecordProblem(name, "ends before its declared size (the file shrank while it was read)")
        done += n
