"""Print the catalogue table, the precision/recall of the cause, the origin figures and,
with ``--policies``, what each policy does with each case (rescued, or stopped within
``max_bad_steps`` with the right diagnosis).

    cd <repo> && PYTHONPATH=$PWD:tests python -m realworld.table [--policies]
"""

from __future__ import annotations

import os
import sys

from .registry import CATALOGUE
from .results import origin_line, precision_recall, result

FRAMEWORKS = ("torch", "keras")


def _origin_right(case, fw, d) -> bool:
    if d is None or d.op is None or d.op.op not in case.ops[fw]:
        return False
    module, line = origin_line(fw, case.name)
    return os.path.basename(d.op.file or "") == module and d.op.line == line


def main(policies: bool = False) -> None:
    rows, origins, crashes = [], [], 0
    print("| case | source | expected | torch | keras | origin (torch / keras) | advice (first clause) |")
    print("|---|---|---|---|---|---|---|")
    for case in CATALOGUE:
        got = {}
        for fw in case.frameworks:
            try:
                got[fw] = (result(fw, case.name, False)[0], result(fw, case.name, True)[0])
            except Exception as exc:  # noqa: BLE001 - counted, shown
                crashes += 1
                got[fw] = (None, None)
                print(f"crash: {case.name} on {fw}: {type(exc).__name__}: {exc}", file=sys.stderr)
        cells = [(f"{d.cause if d else None}{'' if f is None else ' (fixed variant diagnosed!)'}" if fw in got else "n/a")
                 for fw, (d, f) in ((fw, got.get(fw, (None, None))) for fw in FRAMEWORKS)]
        origin = " / ".join((d.op.line_text() if d.op else d.origin) if d else "-" for d, _ in got.values())
        first = next(iter(got.values()))[0]
        print(f"| {case.name} | {case.url} | {case.cause} | {cells[0]} | {cells[1]} | {origin} | "
              f"{first.advice.split(';')[0] if first else '-'} |")
        rows += [(case.cause, d.cause if d else None) for d, _ in got.values()]
        if case.ops:
            origins += [_origin_right(case, fw, d) for fw, (d, _) in got.items()]
    print("\n| cause | TP | FP | FN | precision | recall |\n|---|---|---|---|---|---|")
    table = precision_recall(rows)
    for cause, (tp, fp, fn, p, r) in table.items():
        print(f"| {cause} | {tp} | {fp} | {fn} | {p:.2f} | {r:.2f} |")
    tp = sum(t[0] for t in table.values())
    print(f"\nright cause: {tp}/{len(rows)} ({100 * tp / len(rows):.0f}%); origin op + user line right where one op "
          f"is to blame: {sum(origins)}/{len(origins)} ({100 * sum(origins) / max(1, len(origins)):.0f}%); "
          f"library crashes: {crashes}")
    if policies:
        _policies()


def _policies() -> None:
    from .rescue import MAX_BAD, POLICIES, run

    print(f"\n| case | framework | expected | " + " | ".join(POLICIES) + " |")
    print("|---|---|---|" + "---|" * len(POLICIES))
    totals = {p: [0, 0, 0] for p in POLICIES}  # ok, rescued, crashes
    n = 0
    for case in CATALOGUE:
        for fw in case.frameworks:
            n += 1
            cells = []
            for p in POLICIES:
                o = run(fw, case.name, p)
                ok = o.ok(case.cause)
                totals[p][0] += ok
                totals[p][1] += o.kind == "rescued"
                totals[p][2] += o.kind == "crash"
                cells.append(f"{'ok' if ok else 'NO'} {o.kind}" + (f" ({o.cause}, {o.longest_streak} bad)"
                                                                  if o.kind == "stopped" else ""))
            print(f"| {case.name} | {fw} | {case.cause} | " + " | ".join(cells) + " |")
    print(f"\nper policy (of {n} case-framework runs; ok = rescued, or stopped within max_bad_steps={MAX_BAD} "
          f"with the right diagnosis, or bad data skipped and listed):")
    for p, (ok, rescued, crashed) in totals.items():
        print(f"- {p}: ok {ok}/{n}, rescued {rescued}, crashes {crashed}")


if __name__ == "__main__":
    main(policies="--policies" in sys.argv)
