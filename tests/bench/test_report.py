"""The benchmark's arithmetic and its edit of docs/benchmarks.md (no timing here)."""

from __future__ import annotations

from tests.bench.gen import Window, percentile
from tests.bench.report import BEGIN, END, TITLE, Key, Results, goals, replace_section, spread


def test_percentile_is_nearest_rank_over_every_value() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([7], 99) == 7
    assert percentile([], 50) == 0.0


def test_window_figures_are_per_request_and_per_second() -> None:
    w = Window(
        ok=200,
        errors=0,
        error="",
        seconds=2.0,
        lat_us=[1000] * 199 + [9000],
        server_cpu_s=0.5,
        gen_cpu_s=0.1,
    )
    f = w.figures()
    assert f["rps"] == 100
    assert f["p50_ms"] == 1.0
    assert f["p99_ms"] == 1.0
    assert f["server_cpu_ms"] == 2.5
    assert f["gen_cpu_ms"] == 0.5


def test_spread_gives_median_and_range() -> None:
    assert spread([3.0, 1.0, 2.0], str) == "2.0 [1.0-3.0]"
    assert spread([], str) == "n/a"


def test_ratios_pair_the_systems_within_each_round() -> None:
    results = Results(rounds=2)
    for rnd, (kb_cpu, bao_cpu) in enumerate(((2.0, 1.0), (1.0, 3.0))):
        results.add(
            Key("keybroker", "Decrypt", 1, 64),
            rnd,
            {"rps": 100.0, "server_cpu_ms": kb_cpu, "p99_ms": 10.0},
        )
        results.add(
            Key("openbao", "decrypt", 1, 64),
            rnd,
            {"rps": 50.0, "server_cpu_ms": bao_cpu, "p99_ms": 20.0},
        )
    by_text = {g.text: g for g in goals(results, [1], 64)}
    per_cpu = by_text["Decrypt at 64: requests per server CPU-second vs OpenBao (1 worker)"]
    assert sorted(per_cpu.values) == [0.5, 3.0]
    assert per_cpu.row()[-1] == "met"  # median 1.75 >= 1.5
    p99 = by_text["Decrypt p99 at 64 vs OpenBao (1 worker)"]
    assert p99.values == [0.5, 0.5]
    assert p99.row()[-1] == "missed"
    batch = by_text[
        "Decrypt batch (16 calls of 100 in flight): items/s vs raw PyKCS11 decrypt (1 worker)"
    ]
    assert batch.row()[2:] == ["n/a", "not measured"]


def test_section_is_created_appended_and_replaced_without_touching_the_rest() -> None:
    ours = f"{TITLE}\n\nfirst"
    created = replace_section(None, ours)
    assert BEGIN in created
    assert "first" in created
    theirs = "# Benchmarks\n\n## File encryption\n\ntheir table\n"
    appended = replace_section(theirs, ours)
    assert appended.startswith(theirs.rstrip("\n"))
    assert appended.count(BEGIN) == 1
    around = appended + "\n## Later section\n\nkept\n"
    replaced = replace_section(around, f"{TITLE}\n\nsecond")
    assert "first" not in replaced
    assert "second" in replaced
    assert "their table" in replaced
    assert "## Later section\n\nkept" in replaced
    assert replaced.count(BEGIN) == 1
    assert replaced.count(END) == 1
