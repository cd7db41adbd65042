"""The overhead benchmark runs (tiny sizes) and writes its results as JSON and its sweep as a PNG.

Only the structure is checked: which contenders ran, that each row's numbers are
ordered, which baseline each ratio uses. No timing is asserted.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TORCH = ["torch bare loop", "torch + clip_grad_norm_", "torch StabilityTrainer (torch.optim)",
         "torch TorchGuard in the loop", "torch TorchGuard(verify_updates=True)", "torch bare under detect_anomaly",
         "torch TorchGuard(clip_norm=1.0)"]
TF = ["tf bare tf.function loop", "tf model.fit", "tf StabilityTrainer (keras SGD)",
      "tf StabilityTrainer (neutral SGD)", "tf keras_guard in model.fit", "tf bare under enable_check_numerics",
      "tf fresh bare loop (new model, tracing included)", "tf fresh StabilityTrainer (new model, tracing included)"]
GUARDS = {"torch": TORCH[2:5] + TORCH[6:], "tensorflow": TF[2:5]}
SWEEP = ["torch bare loop", "torch StabilityTrainer (torch.optim)", "torch TorchGuard in the loop"]


_RUN = {}


@pytest.fixture
def bench(tmp_path_factory):
    """One tiny run of the whole benchmark (every model, both frameworks, the sweep): its JSON, stdout and PNG.

    Run once for the module, on first use. Function-scoped so that the autouse ``needs``
    check (conftest) skips or fails first when a framework is missing. About 30-50 s on
    2 CPU cores, most of it importing Keras and tracing the TF contenders. One thread per
    framework: on a busy machine, two OpenMP threads can make a tiny step 100x slower.
    """
    if not _RUN:  # a failed run is kept too: it is not rerun for every test
        _RUN["result"] = _run(tmp_path_factory.mktemp("bench"))
    out, out_json, out_png = _RUN["result"]
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out_json.read_text()), out.stdout, out_png


def _run(tmp):
    out_json, out_png = tmp / "bench.json", tmp / "sweep.png"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    plot = ["--png", str(out_png)] if importlib.util.find_spec("matplotlib") else []  # the 'scenarios' extra
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--tiny", "--threads", "1",
                          "--json", str(out_json), *plot],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    return out, out_json, out_png


def _check_row(row):
    assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
    assert row["ratio"] > 0


@pytest.mark.needs("torch", "tensorflow")
def test_every_contender_runs_for_every_model(bench):
    results, stdout, _ = bench
    assert set(results["sections"]) == {f"{fw}/{kind}" for fw in ("torch", "tensorflow")
                                        for kind in ("mlp", "conv", "lstm")}
    for key, section in results["sections"].items():
        fw = key.split("/")[0]
        expected = TORCH if fw == "torch" else TF
        # a contender the library refuses for this model is listed as skipped, with the reason
        assert set(section["contenders"]) | set(section["skipped"]) == set(expected), key
        assert set(section["contenders"]) >= set(expected) - {"tf StabilityTrainer (neutral SGD)"}, key
        for name, row in section["contenders"].items():
            _check_row(row)
            assert row["rounds"] == results["settings"]["repeats"]
            assert row["steps"] == (results["settings"]["fresh_steps"] if "fresh" in name else section["steps"])
        assert section["contenders"][section["bare"]]["ratio"] == 1.0
        for name in GUARDS[fw]:
            if name in section["contenders"]:
                assert set(section["contenders"][name]["vs"]) == set(section["references"])
                assert set(section["memory"][name]) >= {"held_bytes", "param_bytes", "optimizer_state_bytes"}
                held = section["memory"][name]["held_bytes"]
                assert held is None or held >= 0  # None until the guards have held_bytes()
                assert section["memory"][name]["param_bytes"] > 0
        print(f"{key}: {section['seconds']:.1f} s")
    assert "x bare" in stdout and "memory held across steps" in stdout and "total" in stdout


@pytest.mark.needs("torch", "tensorflow")
def test_ratios_name_their_own_baselines(bench):
    results, _, _ = bench
    for kind in ("mlp", "conv", "lstm"):
        tf_rows = results["sections"][f"tensorflow/{kind}"]["contenders"]
        guard = tf_rows["tf keras_guard in model.fit"]
        assert guard["baseline"] == "tf model.fit"
        assert guard["ratio_to_baseline"] == guard["vs"]["tf model.fit"]
        fresh = tf_rows["tf fresh StabilityTrainer (new model, tracing included)"]
        assert fresh["baseline"] == "tf fresh bare loop (new model, tracing included)"
        assert fresh["steps"] == results["settings"]["fresh_steps"]
        torch_rows = results["sections"][f"torch/{kind}"]["contenders"]
        assert torch_rows["torch bare loop"]["baseline"] is None
        clipped = torch_rows["torch TorchGuard(clip_norm=1.0)"]
        assert clipped["baseline"] == "torch + clip_grad_norm_"
        assert clipped["ratio_to_baseline"] == clipped["vs"]["torch + clip_grad_norm_"]
    assert results["settings"]["threads"] == 1


@pytest.mark.needs("torch", "tensorflow", "matplotlib")
def test_the_sweep_grows_and_is_plotted(bench):
    results, stdout, png = bench
    rows = results["sweep"]["rows"]
    assert len(rows) >= 3
    params = [row["params"] for row in rows]
    assert params == sorted(params) and len(set(params)) == len(params)
    for row in rows:
        assert set(row["contenders"]) == set(SWEEP)
        assert row["contenders"]["torch bare loop"]["ratio"] == 1.0
        for row_ in row["contenders"].values():
            _check_row(row_)
        assert set(row["memory"]) == set(SWEEP[1:])
        assert row["model_bytes"] == row["params"] * 4  # float32, SGD without momentum: no optimizer state
    assert "size sweep" in stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_reads_held_bytes_where_the_guard_has_it():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from overhead import memory
        from overhead_contenders import Contender
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    class Holds:
        def held_bytes(self):
            return 60

    footprint = lambda: (100, 20)  # noqa: E731
    rows = memory({"bare": Contender(print, footprint=footprint),
                   "new": Contender(print, guarded=True, holders=(object(), Holds()), footprint=footprint),
                   "old": Contender(print, guarded=True, holders=(object(),), footprint=footprint)})
    assert set(rows) == {"new", "old"}  # only guards
    assert rows["new"] == {"held_bytes": 60, "param_bytes": 100, "optimizer_state_bytes": 20, "held_fraction": 0.5}
    assert rows["old"]["held_bytes"] is None and rows["old"]["held_fraction"] is None
