"""What a study declares before it runs: its primary comparisons and the margin of its
equivalence (or non-inferiority) test, kept in declared.json beside its runs.

The file is written when the declaration is first made (before the runs it covers start);
a later command, a rebuild of the report included, uses the recorded declaration, and one
that declares something else is refused.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nemoe.errors import UserError
from tools.comparison.stats import ALPHA

DECLARED_JSON = "declared.json"


@dataclass
class Declaration:
    primaries: list[tuple[str, str]] = field(default_factory=list)  # (arm, baseline): arm minus baseline
    margin: float | None = None          # equivalence (TOST) at +-margin, nats
    noninferiority: float | None = None  # non-inferiority at +margin, nats
    metric: str = "loss_all"             # held-out loss the primaries compare (shift: at the last phase)
    alpha: float = ALPHA
    declared_at: str = ""                # UTC time the file was written
    finished_before: list[str] = field(default_factory=list)  # runs already finished when it was written
    command: str = ""

    def key(self) -> tuple:
        """What a later command may not change."""
        return ([tuple(p) for p in self.primaries], self.margin, self.noninferiority, self.metric)

    @property
    def empty(self) -> bool:
        return not self.primaries and self.margin is None and self.noninferiority is None

    def describe(self) -> str:
        pairs = ", ".join(f"{a} − {b}" for a, b in self.primaries) or "none"
        test = (f"equivalence (TOST) within ±{self.margin:g} nats" if self.margin is not None else
                f"non-inferiority at +{self.noninferiority:g} nats" if self.noninferiority is not None else
                "no margin")
        return f"primaries {pairs}; {test}"


def parse_primaries(text: str | None, strategies: list[str]) -> list[tuple[str, str]]:
    """--primary A-B,C-B -> [(A, B), (C, B)], each a pair of the strategies this command runs."""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        item = item.strip()
        a, sep, b = item.partition("-")
        # strategy names hold underscores, never '-': one '-' separates the arm from its baseline
        if not sep or not a or not b or "-" in b:
            raise UserError(f"--primary {item!r}: expected ARM-BASELINE, e.g. static_max-static_moe")
        missing = [s for s in (a, b) if s not in strategies]
        if missing:
            raise UserError(f"--primary {item!r}: {', '.join(missing)} not among --strategies "
                            f"({', '.join(strategies)})")
        if a == b or (a, b) in pairs or (b, a) in pairs:
            raise UserError(f"--primary {item!r}: a pair of two strategies, each pair once")
        pairs.append((a, b))
    return pairs


def from_args(args, strategies: list[str], metric: str, command: str) -> Declaration:
    """The declaration of this command line (empty when it declares nothing)."""
    for name in ("margin", "noninferiority"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{name} must be a positive number of nats, e.g. 0.02")
    if args.margin is not None and args.noninferiority is not None:
        raise UserError("--margin (equivalence) and --noninferiority: declare one test form, not both")
    primaries = parse_primaries(args.primary, strategies)
    if (args.margin is not None or args.noninferiority is not None) and not primaries:
        raise UserError("a margin is declared for the primary comparisons: name them with --primary A-B,...")
    return Declaration(primaries, args.margin, args.noninferiority, metric, command=command)


def load(folder: Path) -> Declaration | None:
    path = folder / DECLARED_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["primaries"] = [tuple(p) for p in data["primaries"]]
        return Declaration(**data)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a declaration this version reads ({err})") from None


def settle(folder: Path, given: Declaration, finished: list[str]) -> Declaration:
    """The declaration that holds for this folder: the recorded one (a command that declares
    something else is refused), or, on first declaring, `given`, written now with the runs
    already finished. Nothing declared and nothing recorded: the empty declaration, not written."""
    recorded = load(folder)
    if recorded is not None:
        if not given.empty and given.key() != recorded.key():
            raise UserError(f"{folder / DECLARED_JSON} records {recorded.describe()} (declared "
                            f"{recorded.declared_at}); this command declares {given.describe()}. A study's "
                            f"declaration is fixed before it runs: repeat the recorded options or give none "
                            f"(the recorded ones are used), or use another --out/--study")
        if recorded.metric != given.metric:
            raise UserError(f"{folder / DECLARED_JSON} declares primaries on {recorded.metric}, "
                            f"this protocol compares {given.metric}")
        return recorded
    if given.empty:
        return given
    given.declared_at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    given.finished_before = sorted(finished)
    folder.mkdir(parents=True, exist_ok=True)
    record = {**asdict(given), "primaries": [list(p) for p in given.primaries]}
    (folder / DECLARED_JSON).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return given


def declared_lines(d: Declaration) -> list[str]:
    """The report's 'Declared before running' section."""
    lines = ["## Declared before running", ""]
    if d.empty:
        return lines + ["Nothing was declared (no `--primary`, `--margin` or `--noninferiority`): every "
                        "comparison below is secondary, unadjusted, and no difference is called better, "
                        "worse or equivalent.", ""]
    lines += [f"Recorded in `{DECLARED_JSON}` at {d.declared_at} by `{d.command}`.", "",
              f"- primary comparisons (arm − baseline, held-out `{d.metric}`, paired by seed): "
              + (", ".join(f"`{a}` − `{b}`" for a, b in d.primaries) or "none"),
              f"- family: Holm-adjusted p over the {len(d.primaries)} primaries; a primary is called "
              f"better/worse only at Holm-adjusted p < {d.alpha:g} (two-sided paired t-test)"]
    if d.margin is not None:
        lines.append(f"- equivalence margin ±{d.margin:g} nats (TOST: 'equivalent' when both one-sided "
                     f"tests give p < {d.alpha:g}, i.e. the 90% CI lies inside ±{d.margin:g}; 'not "
                     f"equivalent' when the 95% CI lies entirely outside it; else 'inconclusive')")
    if d.noninferiority is not None:
        lines.append(f"- non-inferiority margin +{d.noninferiority:g} nats ('non-inferior' when the 95% "
                     f"CI's upper bound lies below +{d.noninferiority:g}, i.e. the one-sided p shown beside "
                     f"it is below {d.alpha / 2:g}; 'inferior' when its lower bound lies above it; else "
                     f"'inconclusive')")
    if d.finished_before:
        lines.append(f"- **declared after {len(d.finished_before)} run(s) had finished**: "
                     + ", ".join(d.finished_before))
    return lines + [""]
