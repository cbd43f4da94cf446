"""Small modules with one job each: no module of the library is over 500 lines."""
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lrdet_core"
MAX_LINES = 500


def test_every_library_module_is_at_most_500_lines():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 20  # the walk found the package, not an empty folder
    sizes = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines()) for p in modules}
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by job): {too_long}"
