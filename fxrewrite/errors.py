"""Exception types raised by fxrewrite.

Every error the tool raises on bad input is one of these, so the CLI can turn
them into a one-line message and a non-zero exit code instead of a traceback.
"""
from __future__ import annotations

import os


class FxRewriteError(Exception):
    """Base class of every error fxrewrite reports to a user."""


class RuleFileError(FxRewriteError, ValueError):
    """A rule file (or rule built in Python) is invalid; nothing was applied.

    ``problems`` holds one :class:`RuleProblem` per error found; the message
    lists them all, each as ``file:line: rule 'name': what is wrong``.
    """

    def __init__(self, problems: list["RuleProblem"]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class RuleProblem:
    """One error in a rule file: where it is and what is wrong."""

    def __init__(self, file: str, line: int | None, rule: str | None, message: str):
        self.file, self.line, self.rule, self.message = file, line, rule, message

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        who = f"rule '{self.rule}': " if self.rule else ""
        return f"{where}: {who}{self.message}"

    def __repr__(self) -> str:
        return f"RuleProblem({str(self)!r})"


class RewriteError(FxRewriteError, RuntimeError):
    """A rule would leave the graph invalid; the rewrite was refused.

    The input module is never modified: rewriting works on a copy.
    """

    def __init__(self, rule: str, message: str):
        self.rule = rule
        super().__init__(f"rule '{rule}': {message}")


class RebindError(FxRewriteError, ValueError):
    """Parameters could not be re-bound to their origins (missing, duplicated, or shape mismatch)."""


class VerifyError(FxRewriteError, ValueError):
    """Outputs of the original and the rewritten model cannot be compared (structure differs)."""


class DrawError(FxRewriteError, RuntimeError):
    """A drawing could not be rendered (Graphviz failed on it, or the output format is unknown)."""


class GraphvizMissing(DrawError):
    """Graphviz's ``dot`` program is not installed (or not on ``PATH``), so nothing could be rendered.

    The DOT source is still written when a file was asked for; ``dot_path`` says where
    (the ``.dot`` file, the folder for :func:`fxrewrite.draw.write_rewrite_drawings`, or
    ``None`` when nothing was written). The message says how to install Graphviz.
    """

    def __init__(self, message: str, dot_path=None):
        self.dot_path = dot_path
        super().__init__(message)


class OutputError(FxRewriteError, ValueError):
    """An output path is unusable (exists, is an input, is not a regular file, folder missing ...); nothing was written."""


class OutputWriteError(FxRewriteError, OSError):
    """Writing an output failed (disk full, I/O error ...); the message names it and says what was left (nothing)."""

    def __init__(self, message: str, cause: OSError, path: "str | os.PathLike[str]"):
        super().__init__(cause.errno, message)
        self.message = message
        self.filename = os.fspath(path)

    def __str__(self) -> str:
        return self.message
