"""The promise the benchmark guards, checked on every run: fusedtie never costs more than plain
beyond the tie's budget, and never more than the forum recipe it replaces.

Targets (benchmarks/README.md, "Targets"): fusedtie/plain at most 1.05, in inference and in a
training step; fusedtie+cache/plain at most 1.02 in inference; fusedtie's ratio never above forum's.
A miss is flagged in the table (a trailing "!") and listed after it, never hidden. Ratios are
medians of interleaved samples; on a shared machine a case near its target can flip with noise,
which is why each miss is printed beside plain's IQR.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

FUSEDTIE = "fusedtie"
CACHED = "fusedtie+cache"
FORUM = "forum"
PLAIN = "plain"
# contender -> (largest ratio to plain, the modes the target covers)
RATIO_TARGETS: dict[str, tuple[float, tuple[str, ...]]] = {
    FUSEDTIE: (1.05, ("inference", "train")),
    CACHED: (1.02, ("inference",)),
}


@dataclass(frozen=True)
class Miss:
    case: str  # "shape | f | mode" (dtype too where the run has several)
    contender: str
    ratio: float
    limit: float  # the target, or forum's ratio
    against: str  # "plain" or "forum"
    plain_iqr_pct: float

    def line(self) -> str:
        return (
            f"  {self.case}: {self.contender}/{self.against} {self.ratio:.2f} > {self.limit:.2f}"
            f" (plain's IQR {self.plain_iqr_pct:.0f}%)"
        )


def flagged(contender: str, by_name: dict[str, dict]) -> bool:
    """Whether this contender's cell of a case misses a target."""
    return any(m.contender == contender for m in case_misses("", by_name))


def case_misses(case: str, by_name: dict[str, dict]) -> list[Miss]:
    """Every target one case misses; by_name maps contender to its JSON record."""
    misses = []
    iqr = by_name[PLAIN]["iqr_pct"]
    for name, (limit, modes) in RATIO_TARGETS.items():
        record = by_name.get(name)
        if record is not None and record["mode"] in modes and record["ratio_to_plain"] > limit:
            misses.append(Miss(case, name, record["ratio_to_plain"], limit, PLAIN, iqr))
    tied, forum = by_name.get(FUSEDTIE), by_name.get(FORUM)
    if tied is not None and forum is not None and tied["ratio_to_plain"] > forum["ratio_to_plain"]:
        misses.append(Miss(case, FUSEDTIE, tied["ratio_to_plain"] / forum["ratio_to_plain"], 1.0, FORUM, iqr))
    return misses


def _worst(cases: dict[str, dict[str, dict]], numerator: str, denominator: Optional[str]) -> Optional[tuple]:
    worst = None
    for case, by_name in cases.items():
        if numerator not in by_name or (denominator is not None and denominator not in by_name):
            continue
        ratio = by_name[numerator]["ratio_to_plain"]
        if denominator is not None:
            ratio /= by_name[denominator]["ratio_to_plain"]
        if worst is None or ratio > worst[0]:
            worst = (ratio, case)
    return worst


def summary(cases: dict[str, dict[str, dict]]) -> tuple[list[str], list[Miss]]:
    """The closing lines and the misses, for cases keyed by their description."""
    lines = []
    for label, numerator, denominator in (
        ("fusedtie/plain", FUSEDTIE, None),
        ("fusedtie/forum", FUSEDTIE, FORUM),
        ("fusedtie+cache/plain", CACHED, None),
    ):
        worst = _worst(cases, numerator, denominator)
        if worst is not None:
            lines.append(f"worst {label}: {worst[0]:.2f} ({worst[1]})")
    misses = [m for case, by_name in cases.items() for m in case_misses(case, by_name)]
    return lines, misses
