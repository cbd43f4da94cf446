"""The README's quick start runs end to end."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_trains_and_evaluates():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("step 0: lr/classification=") and "distill/mse=" in lines[0]
    assert lines[-1].startswith("eval: ") and "boxes predicted at low resolution" in lines[-1]
