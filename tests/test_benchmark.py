"""The overhead benchmark runs (tiny size) and writes its table as JSON. No timing is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.needs("tensorflow")
def test_overhead_benchmark_runs_on_a_tiny_model(tmp_path):
    out_json = tmp_path / "bench.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--tiny", "--json", str(out_json)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out_json.read_text())
    assert set(results) == {"torch/mlp", "tensorflow/mlp", "torch/conv", "tensorflow/conv"}
    torch_mlp = results["torch/mlp"]["contenders"]
    for name in ("torch bare loop", "torch + clip_grad_norm_", "torch StabilityTrainer (torch.optim)",
                 "torch TorchGuard in the loop", "torch bare under detect_anomaly"):
        row = torch_mlp[name]
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
    assert torch_mlp["torch bare loop"]["ratio"] == 1.0
    assert results["tensorflow/mlp"]["contenders"]["tf keras_guard in model.fit"]["vs"] == "tf model.fit"
    assert "ratio" in out.stdout and "memory:" in out.stdout
