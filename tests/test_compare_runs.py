"""examples/compare_runs.py pairs seeds across result files and refuses files with other settings."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "compare_runs.py"
CONFIG = {"scale": 0.5, "teacher_iters": 600, "iters": 350, "batch": 8, "lr": 1e-3, "teacher_seed": 0}


def _write(path, runs, **config):
    path.write_text(json.dumps({"config": {**CONFIG, **config}, "runs": runs}))
    return str(path)


def _run(aps_val, aps_cross=None):
    return {str(s): {"val": {"AP": a}, "cross_site": {"AP": (aps_cross or aps_val)[s]}} for s, a in enumerate(aps_val)}


def test_paired_differences(tmp_path):
    a = _write(tmp_path / "a.json", {"lr_baseline": _run([0.10, 0.12]), "lrdet": _run([0.13, 0.14])})
    b = _write(tmp_path / "b.json", {"lrdet_l1": _run([0.11, 0.17])})
    out = subprocess.run([sys.executable, str(SCRIPT), a, b], capture_output=True, text=True, check=True).stdout
    row = next(l for l in out.splitlines() if l.startswith("| lrdet_l1 "))
    assert "| 0.140 ± 0.042 | 0.030 ± 0.028 | 0.005 ± 0.035 |" in row  # (0.01, 0.05) and (-0.02, 0.03)


def test_refuses_other_settings(tmp_path):
    a = _write(tmp_path / "a.json", {"lr_baseline": _run([0.1]), "lrdet": _run([0.1])})
    b = _write(tmp_path / "b.json", {"lrdet_l1": _run([0.1])}, iters=800)
    out = subprocess.run([sys.executable, str(SCRIPT), a, b], capture_output=True, text=True)
    assert out.returncode != 0 and "was run with other settings" in out.stderr


def test_contrast_rows_give_mean_standard_error_and_positive_seeds(tmp_path):
    a = _write(tmp_path / "a.json", {"lr_baseline": _run([0.10, 0.12, 0.11]), "inherit": _run([0.13, 0.14, 0.12])})
    b = _write(tmp_path / "b.json", {"lrdet_fd_only": _run([0.15, 0.13, 0.16])})
    out = subprocess.run([sys.executable, str(SCRIPT), a, b, "--contrast", "lrdet_fd_only", "inherit"],
                         capture_output=True, text=True, check=True).stdout
    # diffs 0.02, -0.01, 0.04: mean 0.0167, std 0.02517, SE 0.01453, 2 of 3 positive
    assert "| lrdet_fd_only − inherit | +0.0167 ± 0.0145 | 2/3 |" in out
    bad = subprocess.run([sys.executable, str(SCRIPT), a, "--contrast", "lrdet", "inherit"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no runs of ['lrdet']" in bad.stderr
