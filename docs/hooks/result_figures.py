"""mkdocs hook: every figure of ``examples/results/`` is served as ``figures/<name>.png``.

The pages show the committed result files themselves, so a figure cannot drift from the run that wrote it
(no copy lives under ``docs/``). A page links one as ``![...](figures/deepforest_full_ap.png)`` (from
``docs/``) or ``../figures/...`` (from a subfolder).
"""
from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[2] / "examples" / "results"


def on_files(files, config):
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"figures/{png.name}", abs_src_path=str(png)))
    return files
