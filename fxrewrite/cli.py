"""The ``fxrewrite`` command line.

Core commands live here (``demo``, ``rules``; ``rewrite`` in :mod:`fxrewrite.rewrite_cli`); plug-ins add theirs (the YOLOv9
plug-in adds ``convert``, ``draw``, ``export``). A plug-in declares each command
under the ``fxrewrite.commands`` entry-point group as ``name = "module:register"``,
``register(subparsers)`` adding its subparser; only the code of the command that
runs is imported (``fxrewrite convert`` never imports the ONNX exporter, ``fxrewrite
rules`` no plug-in at all unless it needs one). A plug-in that declares no command
there may still add its commands through a ``register_cli(subparsers)`` function
(loaded for ``--help`` and for a command nothing declares).
Errors fxrewrite knows about print one line to stderr and exit with status 1
(2 for usage errors); nothing is left half-written.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import select
import signal
import sys
from importlib import metadata
from typing import NoReturn, Sequence

from . import registry
from .errors import FxRewriteError

COMMAND_GROUP = "fxrewrite.commands"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command=next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError as exc:
        if not _reader_gone(sys.stdout):  # another pipe (a drawing's `dot` that died ...): an error
            print(f"fxrewrite: error: {exc}", file=sys.stderr)
            return 1
        # The reader of the output went away (`fxrewrite rules | head -1`) before the command
        # finished: end quietly with the status of a program SIGPIPE stopped, as other tools do
        # (a file the command was writing is written whole or not at all). What is still buffered
        # for the output goes to /dev/null (Python's advice), so that no later flush fails again.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, sys.stdout.fileno())
            finally:
                os.close(devnull)
        return 128 + signal.SIGPIPE
    except (FxRewriteError, OSError, ValueError, LookupError) as exc:
        print(f"fxrewrite: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fxrewrite: interrupted; no output was written", file=sys.stderr)
        return 130


def _reader_gone(stream) -> bool:
    """Whether ``stream`` is a pipe whose reading end is closed (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # not a file (a test's captured output) or closed
        return False


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser: every command, or with ``command`` (the one about to run) the core
    commands and that command only, so that no other plug-in code is imported."""
    parser = argparse.ArgumentParser(prog="fxrewrite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the engine on the built-in example model with an auxiliary branch")
    demo.set_defaults(func=_demo)

    rules = sub.add_parser("rules", help="check a rule file, or list actions, checks and shipped rule sets")
    rules.add_argument("files", nargs="*", help="rule files (or shipped names such as yolov9) to check")
    rules.set_defaults(func=_rules)

    from .rewrite_cli import register as register_rewrite  # light: its imports happen when it runs
    register_rewrite(sub)

    _add_plugin_commands(sub, command)
    return parser


def _add_plugin_commands(sub, command: str | None) -> None:
    if command is not None and command in sub.choices:
        return  # a core command
    declared = {ep.name: ep for ep in metadata.entry_points(group=COMMAND_GROUP)}
    plugins = {ep.name: ep.value for ep in metadata.entry_points(group=registry.PLUGIN_GROUP)}

    def owner(ep) -> str | None:  # the plug-in whose package holds the command's code
        return next((name for name, module in plugins.items()
                     if ep.module == module or ep.module.startswith(module + ".")), None)

    chosen = [declared[command]] if command in declared else list(declared.values())
    for ep in chosen:
        if owner(ep) is not None:
            registry.load_plugin(owner(ep))  # its classes and actions registered where plug-ins go
        ep.load()(sub)
    if command in declared:
        return
    with_commands = {owner(ep) for ep in declared.values()}
    for name in sorted(set(plugins) - with_commands):  # plug-ins adding commands the older way
        plugin = registry.load_plugin(name)
        if hasattr(plugin, "register_cli"):
            plugin.register_cli(sub)


def _demo(args) -> int:
    import torch

    from . import load_rules, rewrite, trace, verify
    from .examples import DEMO_RULES, aux_branch_model

    model = aux_branch_model()
    example = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gm = trace(model, example)
    result = rewrite(gm, load_rules(DEMO_RULES, name="<demo rules>"))
    report = verify(model, result.module, example, select_original=(0,))
    before = sum(t.numel() for t in model.parameters())
    after = sum(t.numel() for t in result.module.parameters())
    print("fxrewrite demo: an example model with an auxiliary branch -> its main output only")
    print(result.summary())
    print(f"parameters: {before:,} -> {after:,}")
    print(f"verification against the main output: {report}")
    return 0 if report.equal else 1


def _rules(args) -> int:
    from . import load_rules
    from .rule_file import shipped_rules_dir

    registry.load_all_plugins()  # what is installed: the plug-ins' actions and checks too
    if not args.files:
        print("actions:", ", ".join(registry.action_names()))
        print("checks:", ", ".join(registry.check_names()))
        print("shipped rule sets:", ", ".join(sorted(p.stem for p in shipped_rules_dir().glob("*.yaml"))))
        print("cookbook examples:", ", ".join(sorted(f"examples/{p.stem}"
                                                     for p in shipped_rules_dir().glob("examples/*.yaml"))))
        return 0
    for file in args.files:
        ruleset = load_rules(file)
        print(f"{file}: {len(ruleset)} rule(s) OK: {', '.join(r.name for r in ruleset)}")
    return 0


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``fxrewrite`` program: :func:`main`, then the process ends at once with its status.

    A process that imported torch takes about half a second to end the normal way (measured:
    ``python -c "import torch"`` 1.6 s, 1.1 s ending with ``os._exit``), destroying objects that
    nothing needs any more: by the time :func:`main` returns, every output was written, synced
    to disk, renamed into place and closed, and no thread is left. So only what is still
    buffered (the standard streams, logging) is flushed, then ``os._exit``. :func:`main` itself
    returns normally, for callers in Python. An error escaping :func:`main` ends the usual way
    (with its traceback). (``atexit`` handlers do not run: fxrewrite registers none; a ``--code``
    tree's logging is flushed above.)

    Before :func:`main`, every object alive (torch and fxrewrite, imported by now: they live as long
    as the process) is moved out of the garbage collector's sight with ``gc.freeze``: the first
    full collection of a run otherwise walks all of them, ~0.08 s just after ``import torch``.
    """
    gc.freeze()
    code = main(argv)
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # the reader went away (`fxrewrite ... | head`): nothing to deliver to
            pass
        except (OSError, ValueError) as exc:  # the output could not be written (disk full ...): say so
            code = code or 120  # what Python itself returns when it cannot flush at exit
            with contextlib.suppress(OSError, ValueError):
                os.write(2, f"fxrewrite: error: cannot write its output: {exc}\n".encode())
    os._exit(code)


if __name__ == "__main__":
    run()
