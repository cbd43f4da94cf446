"""The docs site builds with ``mkdocs build --strict``: a broken link, anchor, figure or API reference fails it."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_strictly_with_the_api_reference_and_the_result_figures(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    api = (site / "api" / "index.html").read_text()
    assert "BridgeDistiller" in api and "materialize" in api  # mkdocstrings rendered the docstrings
    figures = sorted(p.name for p in (ROOT / "examples" / "results").glob("*.png"))
    assert figures and all((site / "figures" / name).read_bytes() == (ROOT / "examples" / "results" / name).read_bytes()
                           for name in figures)  # the committed result files themselves
    assert "deepforest_full_ap.png" in (site / "results" / "index.html").read_text()
