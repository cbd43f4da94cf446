"""Packaging: the wheel builds and holds the package; CI runs the README's test command."""
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_builds_with_the_package_and_its_type_marker(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("lrdet_core-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("lrdet_core/__init__.py", "lrdet_core/distiller.py", "lrdet_core/py.typed",
              "lrdet_core/losses/fgd.py", "lrdet_core/kernels/cwd.py"):
        assert f in names, f
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Name: lrdet-core" in meta
    # The core needs torch alone; everything else is an extra.
    core = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert core == ["Requires-Dist: torch>=2.1"], core


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'python -m pip install -e ".[test]" && python -m pytest tests'
    assert command in ci.splitlines()
    assert re.search(r"```bash\n" + re.escape(command) + r"\n```", readme)
    assert (ROOT / "lrdet_core" / "py.typed").exists()
