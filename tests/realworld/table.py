"""Print the catalogue table and the precision/recall of the cause.

    cd <repo> && PYTHONPATH=$PWD:tests python -m realworld.table
"""

from __future__ import annotations

from .registry import CATALOGUE
from .results import precision_recall, result


def main() -> None:
    rows = []
    print("| case | source | expected | torch | keras | origin (torch / keras) | advice (first clause) |")
    print("|---|---|---|---|---|---|---|")
    for case in CATALOGUE:
        got = {fw: result(fw, case.name, False)[0] for fw in ("torch", "keras")}
        fixed = {fw: result(fw, case.name, True)[0] for fw in ("torch", "keras")}
        origin = " / ".join((d.op.line_text() if d.op else d.origin) if d else "-" for d in got.values())
        advice = got["torch"].advice.split(";")[0] if got["torch"] else "-"
        cells = [f"{(d.cause if d else None)}{'' if fixed[fw] is None else ' (fixed variant diagnosed!)'}" for fw, d in got.items()]
        print(f"| {case.name} | {case.url} | {case.cause} | {cells[0]} | {cells[1]} | {origin} | {advice} |")
        rows += [(case.cause, d.cause if d else None) for d in got.values()]
    print("\n| cause | TP | FP | FN | precision | recall |\n|---|---|---|---|---|---|")
    table = precision_recall(rows)
    for cause, (tp, fp, fn, p, r) in table.items():
        print(f"| {cause} | {tp} | {fp} | {fn} | {p:.2f} | {r:.2f} |")
    tp = sum(t[0] for t in table.values())
    print(f"\noverall: {tp}/{len(rows)} right; micro precision {tp / max(1, tp + sum(t[1] for t in table.values())):.2f}, "
          f"micro recall {tp / len(rows):.2f}")


if __name__ == "__main__":
    main()
