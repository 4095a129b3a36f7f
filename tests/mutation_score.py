"""The mutation score of `make mutate`: mutmut's results per module, less the equivalent
mutants listed in docs/testing.md, held to a floor.

Run in the directory where `mutmut run` ran (it reads `mutants/` and the `[tool.mutmut]`
settings of the pyproject.toml there):

    python -m tests.mutation_score --equivalents docs/testing.md --min 90

A mutant that no test kills is either a gap in the tests or equivalent: a change no caller can
observe. The equivalent ones are listed, each with its reason, in the table under "Equivalent
mutants" in docs/testing.md; a row names the function and the mutated line, so it keeps
matching when mutants are renumbered. Mutants that only change an error message are never made
(`do_not_mutate_patterns` in pyproject.toml).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: mutmut's exit codes, by what they mean for the score.
DETECTED = {1, 3, 24, 36, 37, 152, 255, -9, -11, -24}
SURVIVED = {0}
NO_TESTS = {5, 33}
SKIPPED = {34}
SECTION = "## Equivalent mutants"


@dataclass(frozen=True, slots=True)
class Equivalent:
    """One row of the table: `function` (module.qualname) and its mutated line."""

    function: str
    mutated: str
    reason: str


@dataclass(frozen=True, slots=True)
class Mutant:
    name: str
    module: str
    function: str
    exit_code: int | None


def function_of(name: str) -> tuple[str, str]:
    """(module, "module.Class.method") of a mutant name such as
    `broker.services.tokens.xǁTokenServiceǁissue__mutmut_12`."""
    base = name.rpartition("__mutmut_")[0]
    dotted, _, mangled = base.rpartition(".")
    short = dotted.rpartition(".")[2]
    if mangled.startswith("xǁ"):
        qualname = ".".join(mangled[2:].split("ǁ"))
    else:
        qualname = mangled.removeprefix("x_")
    return dotted, f"{short}.{qualname}"


def read_equivalents(doc: Path) -> list[Equivalent]:
    """The rows of the table under `SECTION` in `doc` (columns: function, mutated line,
    reason; code in backticks, `\\|` for a pipe inside a cell)."""
    rows: list[Equivalent] = []
    inside = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            inside = line.strip() == SECTION
            continue
        if not inside or not line.startswith("|"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) != 3 or set(cells[0]) <= {"-", ":", " "} or cells[0] == "function":
            continue
        function, mutated, reason = (c.strip("`") for c in cells)
        rows.append(Equivalent(function, mutated, reason))
    return rows


def mutated_line(name: str, path: Path) -> str:
    """The lines the mutant changes, as mutated (joined by " / ")."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(name, path=path)
    added = [
        line[1:].strip()
        for line in diff.splitlines()
        if line.startswith("+") and not line.startswith("+++")
    ]
    return " / ".join(added) if added else "(lines removed)"


def load() -> tuple[list[Mutant], dict[str, Path]]:
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.utils.file_utils import walk_mutatable_files

    mutants: list[Mutant] = []
    paths: dict[str, Path] = {}
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for name, code in data.exit_code_by_key.items():
            module, function = function_of(name)
            mutants.append(Mutant(name, module, function, code))
            paths[name] = path
    return mutants, paths


def score(detected: int, counted: int) -> float:
    return 100.0 * detected / counted if counted else 100.0


def report(mutants: Iterable[Mutant], paths: dict[str, Path], rows: list[Equivalent]) -> float:
    """Prints the table and the mutants left alive; returns the overall score."""
    by_key = {(r.function, r.mutated): r for r in rows}
    used: set[tuple[str, str]] = set()
    counts: dict[str, Counter[str]] = {}
    alive: list[tuple[Mutant, str]] = []
    for m in sorted(mutants, key=lambda m: m.name):
        c = counts.setdefault(m.module, Counter())
        c["mutants"] += 1
        if m.exit_code is None:
            c["not checked"] += 1
        elif m.exit_code in DETECTED:
            c["killed"] += 1
        elif m.exit_code in SKIPPED:
            c["skipped"] += 1
        else:
            line = mutated_line(m.name, paths[m.name])
            if (m.function, line) in by_key:
                used.add((m.function, line))
                c["equivalent"] += 1
            else:
                c["no tests" if m.exit_code in NO_TESTS else "survived"] += 1
                alive.append((m, line))
    head = f"{'module':<26}{'mutants':>8}{'killed':>8}{'alive':>7}{'equiv.':>8}{'score':>9}"
    print(head)
    total: Counter[str] = Counter()
    for module, c in sorted(counts.items()):
        total.update(c)
        print(_row(module, c))
    print(_row("overall", total))
    for m, line in alive:
        status = "no tests" if m.exit_code in NO_TESTS else "survived"
        print(f"  {status}: {m.function}: {line}    (mutmut show {m.name})")
    for key in sorted(set(by_key) - used):
        print(f"  listed as equivalent, but no such mutant is alive: {key[0]}: {key[1]}")
    if total["not checked"]:
        print(f"  {total['not checked']} mutants were not checked: the run did not finish")
    counted = total["mutants"] - total["equivalent"] - total["skipped"]
    return score(total["killed"], counted)


def _row(module: str, c: Counter[str]) -> str:
    alive = c["survived"] + c["no tests"] + c["not checked"]
    counted = c["mutants"] - c["equivalent"] - c["skipped"]
    value = score(c["killed"], counted)
    counts = f"{c['mutants']:>8}{c['killed']:>8}{alive:>7}{c['equivalent']:>8}"
    return f"{module:<26}{counts}{value:>8.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--equivalents", type=Path, required=True, help="docs/testing.md")
    parser.add_argument("--min", type=float, default=0.0, help="the lowest overall score")
    args = parser.parse_args(argv)
    if not Path("mutants").is_dir():
        print("no mutants/ here: run `mutmut run` first (or `make mutate`)", file=sys.stderr)
        return 2
    mutants, paths = load()
    overall = report(mutants, paths, read_equivalents(args.equivalents))
    if overall < args.min:
        print(f"mutation score {overall:.1f}% is below the floor of {args.min:g}%")
        return 1
    print(f"mutation score {overall:.1f}% (floor {args.min:g}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
