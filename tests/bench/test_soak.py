"""The soak's own logic on made-up runs: the mix, the flatness verdict, the report section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.bench import soak
from tests.bench.soakgen import schedule


def _run(rss: list[float], fds: list[int], errors: int = 0, events: int = 100) -> soak.Run:
    samples = [
        soak.Sample(5.0 * (i + 1), 100.0, 500, {}, 3.0, 9.0, 0, mib, n)
        for i, (mib, n) in enumerate(zip(rss, fds, strict=True))
    ]
    totals: dict[str, Any] = {name: {"ok": 0, "errors": {}} for name in soak.MIX}
    totals["Decrypt"] = {"ok": 100 - errors, "errors": {"UNAVAILABLE": errors} if errors else {}}
    r = soak.Run(seconds=60, rate=100, interval=5, samples=samples)
    r.final = {"sent": 6000, "skipped": 0, "seconds": 60.0, "p50_ms": 3.0, "p99_ms": 9.0}
    r.final["totals"] = totals
    r.audit = {
        "answered": {"Decrypt": 100},
        "events": {"Decrypt": events},
        "outcomes": {"OUTCOME_ALLOWED": events},
        "equal": events == 100,
        "verify_ok": True,
        "events_checked": events,
    }
    return r


def _failed(r: soak.Run) -> set[str]:
    return {name for name, ok, _ in soak.verdict(r) if not ok}


def test_the_mix_is_interleaved_in_its_proportions() -> None:
    order = schedule(soak.MIX)
    assert len(order) == 20
    assert {n: order.count(n) for n in soak.MIX} == soak.MIX
    # The single IssueToken and the two Encrypts are not bunched together.
    encrypts = [i for i, n in enumerate(order) if n == "Encrypt 1 KiB"]
    assert encrypts[1] - encrypts[0] >= 5


def test_a_flat_run_passes_every_check() -> None:
    r = _run([80.0, 84.0] + [85.0] * 10, [30] * 12)
    assert _failed(r) == set()


def test_growth_failures_and_a_missing_event_are_each_caught() -> None:
    leaking = _run([80.0 + 2 * i for i in range(12)], [30 + i for i in range(12)])
    assert _failed(leaking) == {"RSS flat", "descriptors flat"}
    assert _failed(_run([85.0] * 12, [30] * 12, errors=1, events=99)) == {
        "no call failed",
        "one audit event per call answered",
    }


def test_the_report_replaces_only_its_section(tmp_path: Path) -> None:
    doc = tmp_path / "soak.md"
    doc.write_text(f"# Soak\n\nprose\n\n{soak.BEGIN}\nold\n{soak.END}\n\nmore prose\n")
    soak.write_doc(soak.section(_run([85.0] * 12, [30] * 12)), doc)
    text = doc.read_text()
    assert text.startswith("# Soak\n\nprose\n") and text.endswith("more prose\n")
    assert "old" not in text and "Every check passed." in text
    assert text.count(soak.BEGIN) == 1
