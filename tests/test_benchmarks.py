"""The benchmark scripts run end to end in their smoke modes and write what they promise."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_losses_quick(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_losses.py"), "--quick", "--threads", "1",
                          "--out", str(tmp_path), "--tag", "smoke"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "smoke.json").read_text())
    rows = report["rows"] if isinstance(report, dict) and "rows" in report else report
    text = json.dumps(report)
    for loss in ("mse", "l1", "cwd", "fgd"):
        assert f'"{loss}"' in text
    assert (tmp_path / "smoke.md").read_text().count("| torch |") >= 4
    assert rows


def test_bench_step_tiny(tmp_path):
    dest = tmp_path / "step.json"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--models", "retinanet",
                          "--raw", "128", "--lr-size", "64", "--hr-size", "128", "--channels", "16", "--repeats", "1",
                          "--warmup", "0", "--threads", "1", "--out", str(dest)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(dest.read_text())
    parts = report["results"]["retinanet"]["lrdet"]["times_s"]
    assert set(parts) == {"step", "teacher_to_neck", "student_lr_forward", "bridge_forward", "distill_loss", "backward"}
    assert all(t > 0 for ts in parts.values() for t in ts)
    assert "LRDet / sum of parts" in (tmp_path / "step.md").read_text()
