"""The overhead benchmark's harness: it runs (tiny sizes), and prints well-formed ratios and verdicts.

Only the structure is checked: which pairs ran, that each ratio is the median of
the per-round ratios, that a verdict is refused when the A/A pair is off or the
rounds are too few. No timing is asserted. The end-to-end run is marked slow.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TORCH = {"bare loop (A/A twin)": "bare loop", "TorchGuard in the loop": "bare loop",
         "StabilityTrainer (torch.optim)": "bare loop over numpy"}
TF = {"bare loop (A/A twin)": "bare loop", "StabilityTrainer (keras SGD)": "bare loop over numpy",
      "keras_guard in model.fit": "model.fit"}
FRESH = {"fresh StabilityTrainer (tracing included)": "fresh bare loop (tracing included)"}


def _harness():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import overhead
        import overhead_contenders
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return overhead, overhead_contenders


_RUN = {}


@pytest.fixture
def bench(tmp_path_factory):
    """One tiny run of the whole benchmark (every model, both frameworks): its JSON and stdout.

    Run once for the module, on first use; function-scoped so that the autouse ``needs``
    check (conftest) skips or fails first when a framework is missing.
    """
    if not _RUN:  # a failed run is kept too: it is not rerun for every test
        tmp = tmp_path_factory.mktemp("bench")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--tiny",
                              "--references", "--json", str(tmp / "bench.json")],
                             capture_output=True, text=True, env=env, timeout=400, check=False)
        _RUN["result"] = out, tmp / "bench.json"
    out, out_json = _RUN["result"]
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out_json.read_text()), out.stdout


@pytest.mark.slow
@pytest.mark.needs("torch", "tensorflow")
def test_every_pair_runs_for_every_model(bench):
    results, stdout = bench
    settings = results["settings"]
    assert settings["clock"] == "cpu" and settings["threads"] == 1
    assert set(results["sections"]) == {f"{fw}/{kind}" for fw in ("torch", "tensorflow")
                                        for kind in ("mlp", "conv", "lstm", "big")}
    for key, section in results["sections"].items():
        fw, kind = key.split("/")
        pairs = {r["contender"]: r["twin"] for r in section["rows"]}
        expected = dict(TORCH if fw == "torch" else TF, **(FRESH if key == "tensorflow/mlp" else {}))
        assert expected.items() <= pairs.items(), key
        assert [r["aa"] for r in section["rows"]].count(True) == 1  # one A/A pair per section
        for row in section["rows"]:
            assert row["rounds"] == settings["repeats"]
            assert row["min_ratio"] <= row["ratio"] <= row["max_ratio"] and row["ratio"] > 0
            assert row["ms"] > 0 and row["twin_ms"] > 0
            if row["aa"]:
                assert row["verdict"] == ("in range" if abs(row["ratio"] - 1) <= 0.01 else "OFF")
            elif row["bar"] is not None:  # 3 rounds: never a verdict
                assert row["verdict"].startswith("no verdict"), row
        assert section["aa_ok"] == (abs(section["rows"][0]["ratio"] - 1) <= 0.01)
        for name in ("TorchGuard in the loop", "StabilityTrainer (torch.optim)") if fw == "torch" else \
                ("StabilityTrainer (keras SGD)", "keras_guard in model.fit"):
            assert section["memory"][name]["param_bytes"] > 0
    assert results["sections"]["torch/big"]["params"] > results["sections"]["torch/mlp"]["params"]
    assert "A/A: bare loop (A/A twin) / bare loop" in stdout and "cpu time" in stdout and "total" in stdout


def test_ratio_is_the_median_of_the_rounds_and_the_verdict_needs_the_aa_pair():
    overhead, contenders = _harness()
    Pair, Contender = contenders.Pair, contenders.Contender
    pairs = [Pair("twin", "bare", aa=True), Pair("guard", "bare", bar=1.03)]
    times = {"twin": [(1.0, 1.0)] * 15, "guard": [(1.02, 1.0)] * 10 + [(1.5, 1.0)] * 5}
    runs = {n: Contender(print) for n in ("bare", "twin", "guard")}
    rows, aa_ok = overhead.summarize(times, pairs, runs, steps=16)
    assert aa_ok is True
    guard = rows[1]
    assert guard["ratio"] == statistics.median([1.02] * 10 + [1.5] * 5) and guard["max_ratio"] == 1.5
    assert guard["verdict"] == "holds"
    times["guard"] = [(1.04, 1.0)] * 15
    assert overhead.summarize(times, pairs, runs, 16)[0][1]["verdict"] == "MISSES"
    times["twin"] = [(1.02, 1.0)] * 15  # the noise floor is off: no verdict, either way
    rows, aa_ok = overhead.summarize(times, pairs, runs, 16)
    assert aa_ok is False and rows[0]["verdict"] == "OFF" and rows[1]["verdict"] == "no verdict (A/A off)"
    times = {k: v[:14] for k, v in {"twin": [(1.0, 1.0)] * 15, "guard": [(1.0, 1.0)] * 15}.items()}
    assert overhead.summarize(times, pairs, runs, 16)[0][1]["verdict"] == "no verdict (14 rounds < 15)"


def test_measure_alternates_twin_and_contender():
    overhead, contenders = _harness()
    order = []
    runs = {n: contenders.Contender(lambda k, n=n: order.append((n, k))) for n in ("bare", "guard")}
    ticks = iter(range(1000))
    times = overhead.measure(runs, [contenders.Pair("guard", "bare")], steps=4, repeats=2, warmup=1,
                             clock=lambda: next(ticks))
    assert order == [("bare", 1), ("guard", 1), ("bare", 4), ("guard", 4), ("guard", 4), ("bare", 4)]
    assert times == {"guard": [(0.25, 0.25), (0.25, 0.25)]}  # one tick per run of 4 steps


def test_memory_reads_held_bytes_where_the_guard_has_it():
    overhead, contenders = _harness()
    Contender = contenders.Contender

    class Holds:
        def held_bytes(self):
            return 60

    footprint = lambda: (100, 20)  # noqa: E731
    rows = overhead.memory({"bare": Contender(print, footprint=footprint),
                            "new": Contender(print, guarded=True, holders=(object(), Holds()), footprint=footprint),
                            "old": Contender(print, guarded=True, holders=(object(),), footprint=footprint)})
    assert set(rows) == {"new", "old"}  # only guards
    assert rows["new"] == {"held_bytes": 60, "param_bytes": 100, "optimizer_state_bytes": 20, "held_fraction": 0.5}
    assert rows["old"]["held_bytes"] is None and rows["old"]["held_fraction"] is None


def test_width_for_sizes_the_big_model_above_ten_million():
    overhead, _ = _harness()
    cfg = overhead.section_config("big", overhead.SIZES["big"])
    assert overhead.mlp_params(cfg["sizes"]) > 10_000_000
