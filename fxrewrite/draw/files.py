"""Drawings as files and in notebooks: the :class:`Drawing` object (DOT source, rendering with
Graphviz's ``dot``, atomic saving by suffix, inline display in Jupyter). Owns all file I/O of
:mod:`fxrewrite.draw` and the message when ``dot`` is missing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import graphviz

from ..errors import DrawError, GraphvizMissing
from ..io import atomic_write

INSTALL_HINT = (
    "Install Graphviz (the pip package 'graphviz' only calls it): "
    "Debian/Ubuntu: `sudo apt-get install graphviz`; Fedora: `sudo dnf install graphviz`; "
    "macOS: `brew install graphviz`; conda: `conda install -c conda-forge graphviz`; "
    "Windows: `winget install graphviz` (or https://graphviz.org/download/), then add its bin folder to PATH. "
    "Check with `dot -V`."
)
class Drawing:
    """A rendered-on-demand Graphviz drawing: DOT source, SVG/PNG files, inline display in Jupyter.

    ``graph`` is the underlying :class:`graphviz.Digraph` (change its attributes freely
    before saving). ``statuses`` maps every drawn node id to its status (``None`` for
    plain drawings); ``clusters`` maps every drawn node id to its cluster path;
    ``chains`` maps the id of every box that lists a chain of nodes (``fold_chains``)
    to the ids of those nodes, in order (they are in ``statuses`` and ``clusters`` too).
    """

    def __init__(self, graph: graphviz.Digraph, statuses: Mapping[str, str | None] | None = None,
                 clusters: Mapping[str, tuple[str, ...]] | None = None,
                 chains: Mapping[str, Sequence[str]] | None = None):
        self.graph = graph
        self.statuses = dict(statuses or {})
        self.clusters = dict(clusters or {})
        self.chains = {box: list(members) for box, members in (chains or {}).items()}

    @property
    def source(self) -> str:
        """The DOT text."""
        return self.graph.source

    def nodes_with_status(self, status: str) -> list[str]:
        return [node_id for node_id, s in self.statuses.items() if s == status]

    def pipe(self, format: str = "svg") -> bytes:
        """Render with ``dot`` and return the bytes; :class:`GraphvizMissing` when ``dot`` is not installed."""
        try:
            return self.graph.pipe(format=format, quiet=True)
        except graphviz.ExecutableNotFound:
            raise GraphvizMissing(f"cannot render the drawing as {format}: Graphviz's `dot` program was not found "
                                  f"on PATH. {INSTALL_HINT}") from None
        except graphviz.CalledProcessError as exc:
            detail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
            raise DrawError(f"Graphviz failed to render the drawing as {format}: "
                            f"{' '.join(detail[-3:]) or exc}") from None

    def svg(self) -> str:
        return self.pipe("svg").decode("utf-8")

    def png(self) -> bytes:
        return self.pipe("png")

    def save(self, path: str | os.PathLike, format: str | None = None) -> Path:
        """Write the drawing to ``path``; the format comes from the suffix (``.svg``, ``.png``,
        ``.pdf``, ``.dot``/``.gv`` for the DOT source) unless ``format`` is given.

        The file is written atomically (a temporary file in the same folder, then
        renamed), so a failure never leaves a partial file. When ``dot`` is missing the
        DOT source is written next to ``path`` (same name, ``.dot``) and
        :class:`GraphvizMissing` is raised, naming that file.
        """
        path = Path(path)
        fmt = (format or path.suffix.lstrip(".")).lower()
        if fmt in ("dot", "gv"):
            write_atomic(path, self.source.encode("utf-8"))
            return path
        if fmt not in graphviz.FORMATS:
            raise DrawError(f"cannot save a drawing as {path.name!r}: unknown format {fmt or '(no suffix)'!r}; "
                            f"use .svg, .png, .pdf, or .dot for the DOT source")
        try:
            data = self.pipe(fmt)
        except GraphvizMissing as exc:
            dot_path = path.with_suffix(".dot")
            write_atomic(dot_path, self.source.encode("utf-8"))
            raise GraphvizMissing(f"cannot write {path}: Graphviz's `dot` program was not found on PATH; "
                                  f"the DOT source was written to {dot_path} instead (render it later with "
                                  f"`dot -T{fmt} {dot_path} -o {path}`). {INSTALL_HINT}", dot_path) from exc
        write_atomic(path, data)
        return path

    # -- Jupyter -------------------------------------------------------------------------------------
    def _repr_mimebundle_(self, include=None, exclude=None):
        try:
            bundle = {"image/svg+xml": self.svg()}
        except (GraphvizMissing, DrawError) as exc:
            bundle = {"text/plain": f"{exc}\n\n(DOT source: Drawing.source)"}
        if include:
            bundle = {k: v for k, v in bundle.items() if k in include}
        if exclude:
            bundle = {k: v for k, v in bundle.items() if k not in exclude}
        return bundle

    def _repr_svg_(self):
        try:
            return self.svg()
        except (GraphvizMissing, DrawError):
            return None  # Jupyter then falls back to the text representation

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for status in self.statuses.values():
            counts[status or "node"] = counts.get(status or "node", 0) + 1
        what = ", ".join(f"{n} {s}" for s, n in counts.items())
        return f"<Drawing {self.graph.name!r}: {what}>"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, force=True) as handle:
        handle.write(data)


__all__ = ["Drawing", "INSTALL_HINT", "write_atomic"]
