"""The promise the benchmark guards, checked on every run: fusedtie never costs more than plain
beyond the tie's budget, and never more than the forum recipe it replaces.

Targets (benchmarks/README.md, "Targets"): fusedtie/plain at most 1.05, in inference and in a
training step; fusedtie+cache/plain at most 1.02 in inference; fusedtie's ratio never above forum's.
Issue 17's target, fusedtie/plain at most 1.05 on linear cases at batch 1-8 on the CPU in float32,
is the first over fewer cases, with a worst line of its own. A miss is flagged in the table (a
trailing "!") and listed after it, never hidden. Ratios are medians of interleaved samples; on a
shared machine a case near its target can flip with noise, which is why each miss is printed
beside plain's IQR.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from cases import LINEAR

FUSEDTIE = "fusedtie"
CACHED = "fusedtie+cache"
FORUM = "forum"
PLAIN = "plain"
BOTH_MODES = ("inference", "train")


@dataclass(frozen=True)
class RatioTarget:
    """A contender's largest ratio to plain, in some modes, on the cases `covers` accepts."""

    contender: str
    limit: float
    modes: tuple[str, ...]
    scope: str = ""  # the cases covered, in words ("": every case)
    covers: Callable[[dict], bool] = lambda record: True  # a contender's JSON record

    def applies(self, contender: str, record: dict) -> bool:
        return contender == self.contender and record["mode"] in self.modes and self.covers(record)

    @property
    def label(self) -> str:
        return f"{self.contender}/{PLAIN}" + (f" on {self.scope}" if self.scope else "")

    def describe(self) -> str:
        modes = "" if self.modes == BOTH_MODES else " in " + " and ".join(self.modes)
        return f"{self.label} <= {self.limit:.2f}{modes}"


def _issue17_linear(record: dict) -> bool:
    return (
        record["kind"] == LINEAR
        and record["shape_params"]["batch"] <= 8
        and record["device"] == "cpu"
        and record["dtype"] == "float32"
    )


RATIO_TARGETS = [
    RatioTarget(FUSEDTIE, 1.05, BOTH_MODES),
    RatioTarget(CACHED, 1.02, ("inference",)),
    # Issue 17's (FusedTiedLinear): within the first, so its misses are the first's.
    RatioTarget(FUSEDTIE, 1.05, BOTH_MODES, "linear at batch 1-8, CPU float32 (issue 17)", _issue17_linear),
]


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
    """Every target one case misses; by_name maps contender to its JSON record. A contender under
    several ratio targets is held to the strictest, and misses once."""
    misses = []
    iqr = by_name[PLAIN]["iqr_pct"]
    for name, record in by_name.items():
        limits = [t.limit for t in RATIO_TARGETS if t.applies(name, record)]
        if limits and record["ratio_to_plain"] > min(limits):
            misses.append(Miss(case, name, record["ratio_to_plain"], min(limits), PLAIN, iqr))
    tied, forum = by_name.get(FUSEDTIE), by_name.get(FORUM)
    if tied is not None and forum is not None and tied["ratio_to_plain"] > forum["ratio_to_plain"]:
        misses.append(Miss(case, FUSEDTIE, tied["ratio_to_plain"] / forum["ratio_to_plain"], 1.0, FORUM, iqr))
    return misses


def _worst(
    cases: dict[str, dict[str, dict]],
    numerator: str,
    denominator: Optional[str],
    covers: Callable[[dict], bool] = lambda record: True,
) -> Optional[tuple]:
    worst = None
    for case, by_name in cases.items():
        if numerator not in by_name or (denominator is not None and denominator not in by_name):
            continue
        if not covers(by_name[numerator]):
            continue
        ratio = by_name[numerator]["ratio_to_plain"]
        if denominator is not None:
            ratio /= by_name[denominator]["ratio_to_plain"]
        if worst is None or ratio > worst[0]:
            worst = (ratio, case)
    return worst


def describe() -> str:
    """The targets in one line, for the report."""
    return ", ".join([t.describe() for t in RATIO_TARGETS] + [f"{FUSEDTIE} <= {FORUM}"])


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
    for target in [t for t in RATIO_TARGETS if t.scope]:  # a scoped target's own line, with its verdict
        worst = _worst(cases, target.contender, None, lambda record: target.applies(target.contender, record))
        if worst is not None:
            verdict = "within" if worst[0] <= target.limit else "ABOVE"
            lines.append(f"worst {target.label}: {worst[0]:.2f} ({worst[1]}), {verdict} its {target.limit:.2f}")
    misses = [m for case, by_name in cases.items() for m in case_misses(case, by_name)]
    return lines, misses
