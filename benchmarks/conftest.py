"""After the benchmark tables: fxrewrite / torch.fx ratio per size, and growth from one size to the next."""
from __future__ import annotations


TITLES = {
    "prune": "prune + collapse (fxrewrite) vs eliminate_dead_code (torch.fx), mean seconds per round:",
}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    means: dict[str, dict[tuple[str, int], float]] = {}
    for bench in getattr(session, "benchmarks", None) or ():
        info = getattr(bench, "extra_info", {}) or {}
        stats = getattr(bench, "stats", None)
        if "size" in info and "contender" in info and stats is not None:
            means.setdefault(info.get("table", "prune"), {})[(info["contender"], info["size"])] = stats.mean
    for table, found in means.items():
        _table(terminalreporter.write_line, TITLES.get(table, f"{table}: trace + rewrite + rebind (fxrewrite) vs "
                                                              f"symbolic_trace + eliminate_dead_code + recompile "
                                                              f"(torch.fx), mean seconds per round:"), found)


def _table(write, title: str, means: dict[tuple[str, int], float]) -> None:
    sizes = sorted({size for _, size in means})
    write("")
    write(title)
    write(f"{'nodes':>8} {'fxrewrite':>11} {'torch.fx':>11} {'ratio':>7} {'growth fxrewrite':>17} {'growth fx':>10}")
    previous: dict[str, float] = {}
    for size in sizes:
        ours, theirs = means.get(("fxrewrite", size)), means.get(("torch.fx", size))
        ratio = f"{ours / theirs:7.2f}" if ours and theirs else f"{'-':>7}"
        growth = []
        for name, value in (("fxrewrite", ours), ("torch.fx", theirs)):
            growth.append(f"x{value / previous[name]:.1f}" if value and previous.get(name) else "-")
            if value:
                previous[name] = value
        write(f"{size:>8} {_fmt(ours):>11} {_fmt(theirs):>11} {ratio} {growth[0]:>17} {growth[1]:>10}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
