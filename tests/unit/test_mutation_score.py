"""`make mutate`'s score script reads the equivalent mutants from docs/testing.md and names
mutants by module and function (it needs mutmut only to read a run's results)."""

from __future__ import annotations

from pathlib import Path

from tests.mutation_score import function_of, read_equivalents, score

DOC = Path(__file__).parents[2] / "docs" / "testing.md"


def test_mutant_names_map_to_functions() -> None:
    assert function_of("broker.services.tokens.xǁTokenServiceǁissue__mutmut_12") == (
        "broker.services.tokens",
        "tokens.TokenService.issue",
    )
    assert function_of("broker.domain.x_context_json__mutmut_3") == (
        "broker.domain",
        "domain.context_json",
    )


def test_the_equivalent_mutants_table_parses() -> None:
    rows = read_equivalents(DOC)
    assert len(rows) >= 10
    modules = {"blob", "domain", "access", "audit", "tokens"}
    for row in rows:
        assert row.function.split(".")[0] in modules, row
        assert row.mutated and not row.mutated.startswith("`"), row
        assert row.reason, row


def test_a_pipe_inside_a_cell_is_escaped(tmp_path: Path) -> None:
    doc = tmp_path / "t.md"
    doc.write_text(
        "## Equivalent mutants\n\n| function | mutated line | why |\n| --- | --- | --- |\n"
        "| `domain.f` | `x = a \\| b` | because |\n\n## Next\n\n| `domain.g` | `y` | no |\n",
        encoding="utf-8",
    )
    (row,) = read_equivalents(doc)
    assert (row.function, row.mutated, row.reason) == ("domain.f", "x = a | b", "because")
    assert score(9, 10) == 90.0 and score(0, 0) == 100.0
