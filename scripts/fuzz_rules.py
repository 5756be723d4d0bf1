#!/usr/bin/env python3
"""Longer fuzz run of fxrewrite's hostile-input contracts; prints a table of what was tried.

    OMP_NUM_THREADS=1 python3 scripts/fuzz_rules.py --minutes 5

Uses hypothesis (a test dependency already) rather than atheris: the interesting inputs are
*structured* (rule files whose patterns, checks and actions make sense together, random models
to rewrite, pickles with a payload spliced in), and the strategies are shared with the test suite
(tests/helpers/fuzz_strategies.py, tests/helpers/hostile.py). atheris' coverage guidance pays off for
byte-level parsers; here the parser is PyYAML, and byte-level mutation is covered by the
"mutated" kinds below. Each case is checked inside the test body and failures are recorded, not
raised, so hypothesis keeps generating (no shrinking) until the time budget is spent.

Kinds of input, each with its contract (a violation is a "crash"):

* rule files -- generated rule sets, random YAML documents, random text, byte-mutated files
  (often not UTF-8), hostile texts (alias bombs, deep nesting, huge numbers, odd tags):
  ``load_rules`` returns a RuleSet or raises RuleFileError; bounded time;
* rewrites -- random models x generated rule sets: ``rewrite`` returns a valid, runnable module
  or raises RewriteError, and leaves its input unchanged;
* checkpoints -- byte-mutated checkpoints, checkpoints whose pickle is mutated (and repacked, so
  it reaches the unpickler), and checkpoints with a code-execution payload spliced in:
  ``load_checkpoint`` returns a checkpoint or raises CheckpointError, and no payload runs
  (each payload would create a marker file);
* failed writes -- ``fxrewrite convert`` with a fault injected while writing (a random output
  file, after a random number of bytes, disk full or an interrupt): no output and no temporary
  file is left behind, the input is unchanged.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import io
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fxrewrite  # noqa: E402
from fxrewrite import RuleFileError, RuleSet  # noqa: E402
from fxrewrite import io as fio  # noqa: E402
from fxrewrite.yolov9 import DetectionModel  # noqa: E402
from fxrewrite.yolov9.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, save_checkpoint  # noqa: E402

from helpers import fuzz_strategies as fs  # noqa: E402
from helpers import hostile as hh  # noqa: E402


class Tally:
    def __init__(self):
        self.tried: Counter = Counter()
        self.outcomes: dict[str, Counter] = {}
        self.crashes: Counter = Counter()
        self.payloads_run: Counter = Counter()
        self.partial_files: Counter = Counter()
        self.examples: list[str] = []

    def record(self, kind: str, outcome: str) -> None:
        self.tried[kind] += 1
        self.outcomes.setdefault(kind, Counter())[outcome] += 1

    def crash(self, kind: str, what: str) -> None:
        self.crashes[kind] += 1
        if self.crashes[kind] <= 3:  # a few examples of each kind
            self.examples.append(f"[{kind}] {what}")


TALLY = Tally()
WORK = Path(tempfile.mkdtemp(prefix="fxrewrite-fuzz-"))
MARKER = WORK / "PAYLOAD-RAN"


def guarded(kind: str, fn, *args) -> None:
    """Run one case; any exception out of ``fn`` is a crash of the contract."""
    try:
        outcome = fn(*args)
    except Exception as exc:  # noqa: BLE001 - the point is to catch everything
        TALLY.record(kind, "crash")
        TALLY.crash(kind, f"{type(exc).__name__}: {str(exc)[:200]}\n{traceback.format_exc(limit=4)}"
                          f"input: {repr(args)[:400]}")
        return
    TALLY.record(kind, outcome)
    if MARKER.exists():
        TALLY.payloads_run[kind] += 1
        MARKER.unlink()


# ---------------------------------------------------------------------------- rule files
def load_contract(source, **kwargs) -> str:
    started = time.perf_counter()
    try:
        ruleset = fxrewrite.load_rules(source, **kwargs)
        assert isinstance(ruleset, RuleSet)
        outcome = "loaded"
    except RuleFileError as exc:
        assert exc.problems and str(exc)
        outcome = "refused"
    if time.perf_counter() - started > 30:
        raise AssertionError(f"load_rules took {time.perf_counter() - started:.0f} s")
    return outcome


def mutated_file_contract(data: bytes) -> str:
    path = WORK / "mutated.yaml"
    path.write_bytes(data)
    first = load_contract(path)
    load_contract(data.decode("latin-1") + "\n", name="<mutated>")
    return first


# ---------------------------------------------------------------------------- checkpoints
def mini_checkpoint() -> bytes:
    torch.manual_seed(0)
    model = DetectionModel(hh.MINI).eval()
    path = save_checkpoint(model, WORK / "mini.pt", force=True)
    return path.read_bytes()


def checkpoint_contract(data: bytes) -> str:
    path = WORK / "fuzzed.pt"
    path.write_bytes(data)
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as exc:
        assert str(exc).startswith(str(path)), str(exc)
        return "refused"
    assert isinstance(loaded, LoadedCheckpoint)
    # It loaded (the damage hit tensor data or a harmless value): the converter must cope with it too,
    # converting it or failing with an error it reports (exit code 1), and leaving nothing behind.
    from fxrewrite.cli import main

    out = WORK / "converted"
    out.mkdir(exist_ok=True)
    for p in out.iterdir():
        p.unlink()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["convert", str(path), "-o", str(out / "gelan.pt")])
    left = sorted(p.name for p in out.iterdir())
    if code != 0:
        assert code == 1 and err.getvalue().count("\n") == 1, err.getvalue()
        if left:
            TALLY.partial_files["checkpoints: loaded, then converted"] += len(left)
            raise AssertionError(f"a failed conversion left {left}")
        return "loaded, conversion refused"
    assert left in ([], ["gelan.params.json", "gelan.pt", "gelan.yaml"]), left  # [] = nothing to convert
    return "loaded and converted"


def repack(data: bytes, pickle_bytes: bytes) -> bytes:
    """The checkpoint ``data`` with its data.pkl replaced (CRCs recomputed, so the pickle is read)."""
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name in source.namelist():
            z.writestr(name, pickle_bytes if name.endswith("/data.pkl") else source.read(name))
    return out.getvalue()


def data_pkl(data: bytes) -> bytes:
    z = zipfile.ZipFile(io.BytesIO(data))
    return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


SPLICES = [  # GLOBAL opcodes that would run code; spliced over an official class name in the pickle
    b"cos\nsystem\n", b"cposix\nsystem\n", b"cbuiltins\neval\n", b"cbuiltins\nexec\n", b"c__builtin__\neval\n",
    b"csubprocess\nPopen\n", b"csubprocess\ncheck_output\n", b"cbuiltins\n__import__\n", b"cshutil\nrmtree\n",
    b"ctorch\nload\n", b"ctorch.serialization\nload\n", b"cnumpy\nload\n", b"cpickle\nloads\n",
    b"ctorch._C\n_jit_pass_onnx\n", b"cbuiltins\ngetattr\n", b"cbuiltins\nsetattr\n",
]


@st.composite
def spliced_pickles(draw, pkl: bytes) -> bytes:
    """A real model's pickle with one class reference replaced by a code-execution gadget and the
    following string argument (if any) replaced by a command that would create the marker."""
    data = bytearray(pkl)
    starts = [i for i in range(len(data) - 1) if data[i] == ord("c") and data[i + 1:i + 8] == b"models."]
    if not starts:
        return bytes(data)
    i = draw(st.sampled_from(starts))
    end = data.index(b"\n", data.index(b"\n", i) + 1) + 1
    data[i:end] = draw(st.sampled_from(SPLICES))
    if draw(st.booleans()):  # also make the next short string the payload's argument
        j = data.find(b"X", i)
        if j > 0:
            cmd = f"touch {MARKER}".encode()
            old_len = int.from_bytes(data[j + 1:j + 5], "little")
            if j + 5 + old_len <= len(data):
                data[j:j + 5 + old_len] = b"X" + len(cmd).to_bytes(4, "little") + cmd
    return bytes(data)


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "zero", "insert", "delete"]))
        i = draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "flip" and out:
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del out[i:]
        elif op == "zero":
            out[i:i + 64] = bytes(len(out[i:i + 64]))
        elif op == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[i:i + draw(st.integers(1, 64))]
    return bytes(out)


# ---------------------------------------------------------------------------- failed writes
def failed_write_contract(source: Path, nth: int, limit: int, interrupt: bool, force_existing: bool) -> str:
    from fxrewrite.cli import main

    out = WORK / "out"
    if out.exists():
        for p in out.iterdir():
            p.unlink()
    else:
        out.mkdir()
    previous = {}
    if force_existing:
        for name in ("gelan.pt", "gelan.yaml", "gelan.params.json"):
            (out / name).write_bytes(f"previous {name}".encode())
            previous[name] = f"previous {name}".encode()
    before = source.read_bytes()
    real = fio._open_temp
    opened = []

    def open_temp(folder, name):
        temp, handle = real(folder, name)
        opened.append(name)
        if len(opened) == nth:
            error = KeyboardInterrupt() if interrupt else OSError(errno.ENOSPC, "No space left on device")
            handle = FailingHandle(handle, limit, error)
        return temp, handle

    fio._open_temp = open_temp
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = main(["convert", str(source), "-o", str(out / "gelan.pt"), *(["--force"] if force_existing else [])])
    finally:
        fio._open_temp = real
    left = {p.name: p.read_bytes() for p in out.iterdir()}
    assert source.read_bytes() == before, "the input changed"
    if code == 0:  # the fault came after the last byte: a complete, normal conversion
        assert sorted(left) == ["gelan.params.json", "gelan.pt", "gelan.yaml"], sorted(left)
        return "written"
    if left != previous:
        TALLY.partial_files["failed writes"] += len(set(left) ^ set(previous)) or 1
        raise AssertionError(f"left behind: {sorted(left)} (expected {sorted(previous)})")
    return "nothing left"


class FailingHandle:
    def __init__(self, handle, limit, error):
        self._handle, self._limit, self._error, self._written = handle, limit, error, 0

    def write(self, data):
        if self._written + len(data) > self._limit:
            self._handle.write(bytes(data[: self._limit - self._written]))
            self._written = self._limit
            raise self._error
        self._written += len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)


# ---------------------------------------------------------------------------- driver
ONLY: list[str] = []


def phase(kind: str, strategy, fn, seconds: float, batch: int = 100) -> None:
    if ONLY and not any(word in kind for word in ONLY):
        return
    deadline = time.monotonic() + seconds

    @settings(max_examples=batch, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(value):
        if time.monotonic() < deadline:
            guarded(kind, fn, *(value if isinstance(value, tuple) else (value,)))

    while time.monotonic() < deadline:
        run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="total time budget (default 3)")
    parser.add_argument("--only", nargs="+", default=[], metavar="WORD",
                        help="run only the kinds whose name contains one of these words (e.g. checkpoints)")
    args = parser.parse_args()
    ONLY.extend(args.only)
    warnings.filterwarnings("ignore", message="Detected pickle protocol")  # mutated pickles claim any protocol
    budget = args.minutes * 60
    shares = {"rules": 0.30, "rewrites": 0.35, "checkpoints": 0.25, "writes": 0.10}
    started = time.monotonic()

    # rule files
    for name, text in fs.HOSTILE_TEXTS.items():
        guarded("rule files: hostile texts", load_contract, text)
    for name, data in fs.HOSTILE_BYTES.items():
        guarded("rule files: hostile texts", mutated_file_contract, data)
    rule_time = budget * shares["rules"]
    phase("rule files: generated rule sets", fs.rule_documents().map(fs.dump), load_contract, rule_time * 0.35)
    phase("rule files: random YAML documents", fs.yaml_documents.map(lambda d: fs.dump(d) + "\n"), load_contract,
          rule_time * 0.15)
    phase("rule files: random text", st.text(max_size=400).map(lambda t: t + "\n"), load_contract, rule_time * 0.1)
    seeds = st.one_of(st.just(fs.VALID_RULE_FILE), fs.rule_documents().map(fs.dump),
                      st.sampled_from([t for t in fs.HOSTILE_TEXTS.values() if len(t) < 5000]))
    phase("rule files: byte-mutated files", fs.mutated_texts(seeds), mutated_file_contract, rule_time * 0.4)

    # rewrites
    phase("rewrites: random model x rule set", st.tuples(fs.random_models(), fs.rule_documents()),
          lambda mx, doc: fs.check_rewrite_contract(mx[0], mx[1], fs.dump(doc)), budget * shares["rewrites"],
          batch=50)

    # checkpoints
    good = mini_checkpoint()
    pkl = data_pkl(good)
    for name, (payload, _) in hh.handcrafted_payloads(MARKER).items():
        guarded("checkpoints: payloads", checkpoint_contract, hh.torch_zip_with_pickle(WORK / "p.pt", payload)
                .read_bytes())
    for name, (cls, _) in hh.reduce_payloads().items():
        path = WORK / "r.pt"
        torch.save({"model": None, "epoch": cls(MARKER)}, path)
        guarded("checkpoints: payloads", checkpoint_contract, path.read_bytes())
    ckpt_time = budget * shares["checkpoints"]
    phase("checkpoints: payloads", spliced_pickles(pkl).map(lambda p: repack(good, p)), checkpoint_contract,
          ckpt_time * 0.4)
    phase("checkpoints: mutated pickles", byte_mutations(pkl).map(lambda p: repack(good, p)), checkpoint_contract,
          ckpt_time * 0.3)
    phase("checkpoints: mutated files", byte_mutations(good), checkpoint_contract, ckpt_time * 0.3)

    # failed writes
    source = WORK / "source.pt"
    source.write_bytes(good)
    phase("failed writes", st.tuples(st.just(source), st.integers(1, 3), st.integers(0, 200_000), st.booleans(),
                                     st.booleans()),
          failed_write_contract, max(budget - (time.monotonic() - started), 10), batch=5)

    print_table(time.monotonic() - started)
    return 1 if TALLY.crashes or TALLY.payloads_run or TALLY.partial_files else 0


def print_table(elapsed: float) -> None:
    rows = [(kind, TALLY.tried[kind], TALLY.crashes[kind], TALLY.payloads_run[kind], TALLY.partial_files[kind],
             ", ".join(f"{o} {n}" for o, n in TALLY.outcomes[kind].most_common()))
            for kind in TALLY.tried]
    header = ("input kind", "tried", "crashes", "payload runs", "partial files", "outcomes")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(5)]
    line = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths)) + "  {}"
    print(f"fxrewrite fuzz run: {elapsed / 60:.1f} min, torch {torch.__version__}")
    print(line.format(*header))
    for row in rows:
        print(line.format(*row))
    total = ("total", sum(TALLY.tried.values()), sum(TALLY.crashes.values()), sum(TALLY.payloads_run.values()),
             sum(TALLY.partial_files.values()), "")
    print(line.format(*total))
    for example in TALLY.examples:
        print("\n" + example)


if __name__ == "__main__":
    sys.exit(main())
