"""The tables of results in README.md and docs/ against the committed result files, so that they cannot drift.

A table of results is preceded by a marker naming the files of ``examples/results/`` its numbers come from::

    <!-- contrasts: deepforest_powered.json -->
    <!-- contrasts: deepforest_powered_sgd.json | deepforest_powered.json -->
    <!-- methods: deepforest_full.json + deepforest_full_losses.json -->

``contrasts`` tables have rows ``A − B`` (paired by seed: mean ± SE, seeds > 0, per seed); ``methods`` tables
have a row per method (mean ± std over seeds of AP, AP50, AP_S, cross-site AP; paired differences ``Δ ... vs
X``; the number of seeds). ``+`` merges files of one setting, as ``examples/compare_runs.py`` does; ``|`` gives
each ``mean ± SE`` cell of a row the next source, left to right. The numbers are recomputed from the runs in the
files (``compare_runs.paired``), never written here: replacing a result file makes the page that quotes it fail
until its numbers are updated. Every table whose header names a paired quantity must carry a marker.
"""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from tiny import load_example

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "examples" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKER = re.compile(r"<!--\s*(contrasts|methods):\s*(.*?)\s*-->")
PM = re.compile(r"^([+-]?\d+\.\d+)\s*±\s*(\d+\.\d+)(?:\s*\((\d+)/(\d+)\))?$")
NUMBER = re.compile(r"^[+-]?\d+\.\d+$")
FRACTION = re.compile(r"^(\d+)/(\d+)$")
#: What the pages call the methods; a method's own key (``lrdet_cwd``) works too.
NAMES = {"HR teacher": "hr_teacher", "LR baseline": "lr_baseline", "upsample distillation": "fitnet_up",
         "Fitnet/Up": "fitnet_up", "bridge": "bridge", "inherit": "inherit", "inherit only": "inherit",
         "LRDet": "lrdet", "bridge + inherit": "lrdet", "LRDet-MSE": "lrdet", "MSE": "lrdet", "L1": "lrdet_l1",
         "CWD": "lrdet_cwd", "FGD": "lrdet_fgd", "HR detection loss only": "lrdet_det_only",
         "distillation only": "lrdet_fd_only"}

compare_runs = load_example("compare_runs")


def _clean(cell: str) -> str:
    return cell.replace("**", "").replace("−", "-").strip()


def _label(cell: str) -> str:
    """A row label without emphasis, a leading ``+ `` and a trailing parenthesis."""
    text = re.sub(r"\s*\([^()]*\)\s*$", "", cell.replace("**", "").strip())
    return text[2:] if text.startswith("+ ") else text


def _method(name: str, runs: dict) -> str:
    key = NAMES.get(name, name)
    assert key in runs, f"no runs of {name!r} (method {key!r}) in the marked files; methods: {sorted(runs)}"
    return key


def _tables(path: Path):
    """``(line, kind, sources, header, rows)`` of every table on the page; kind is None without a marker."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("|"):
            i += 1
            continue
        start = i
        while i < len(lines) and lines[i].startswith("|"):
            i += 1
        cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[start:i]]
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        m = MARKER.search(before)
        sources = [[f.strip() for f in group.split("+")] for group in m.group(2).split("|")] if m else []
        out.append((start + 1, m.group(1) if m else None, sources, cells[0], cells[2:]))
    return out


def _runs(files) -> dict:
    runs = {}
    for name in files:
        runs.update(json.loads((RESULTS / name).read_text())["runs"])
    return runs


def _close(printed: str, value: float) -> bool:
    decimals = len(printed.split(".")[1])
    return abs(float(printed) - value) <= 0.5 * 10 ** -decimals + 1e-12


def _check_contrasts(sources, header, rows) -> list:
    bad = []
    for row in rows:
        a, b = (_label(x) for x in _clean(row[0]).split(" - "))
        group, diffs = -1, None
        for head, raw in zip(header[1:], row[1:]):
            cell, head = _clean(raw), _clean(head).lower()
            if not cell:
                continue
            m = PM.match(cell)
            if m or head == "mean":
                group += 1
                runs = _runs(sources[group % len(sources)])
                diffs = compare_runs.paired(runs, _method(a, runs), _method(b, runs))
            mean, se = compare_runs.mean_se(diffs)
            wrong = None
            if m:
                if not (_close(m.group(1), mean) and _close(m.group(2), se)):
                    wrong = f"{mean:+.4f} ± {se:.4f}"
                elif m.group(3) and (int(m.group(3)), int(m.group(4))) != (sum(d > 0 for d in diffs), len(diffs)):
                    wrong = f"({sum(d > 0 for d in diffs)}/{len(diffs)})"
            elif head == "mean":
                wrong = None if _close(cell, mean) else f"{mean:+.4f}"
            elif head == "se":
                wrong = None if _close(cell, se) else f"{se:.4f}"
            elif FRACTION.match(cell):
                positive = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
                wrong = None if cell == positive else positive
            elif head == "per seed":
                printed = [x.strip() for x in cell.split(",")]
                ok = len(printed) == len(diffs) and all(_close(p, d) for p, d in zip(printed, diffs))
                wrong = None if ok else ", ".join(f"{d:+.3f}" for d in diffs)
            else:
                wrong = "a cell this test cannot read"
            if wrong:
                bad.append(f"{row[0]} | {head}: the page says {raw!r}, the files {wrong}")
    return bad


def _column(head: str):
    """``(split, metric, against)`` of a methods-table column, ``("n",)`` for the seed count, None to skip."""
    h = _clean(head)
    low = h.lower()
    if low in ("n", "seeds"):
        return ("n",)
    split = "cross_site" if "cross-site" in low else "val"
    if "Δ" in h:
        against = re.sub(r"\s*\(.*$", "", h.split(" vs ", 1)[1]).strip()
        return split, "AP", against
    for metric in ("AP50", "AP_S", "AP"):
        if metric.lower() in low:
            return split, metric, None
    return None


def _check_methods(sources, header, rows) -> list:
    runs, bad = _runs(sources[0]), []
    columns = [_column(h) for h in header]
    for row in rows:
        method = _method(_label(row[0]), runs)
        for head, col, raw in zip(header[1:], columns[1:], row[1:]):
            cell = _clean(raw)
            if col is None or not cell or cell == "-":
                continue
            if col == ("n",):
                wrong = None if int(cell) == len(runs[method]) else str(len(runs[method]))
            else:
                split, metric, against = col
                values = ([r[split][metric] for r in runs[method].values()] if against is None
                          else compare_runs.paired(runs, method, _method(against, runs), split, metric))
                mean = statistics.mean(values)
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                m = PM.match(cell)
                if m:
                    ok = len(values) > 1 and _close(m.group(1), mean) and _close(m.group(2), std)
                else:
                    ok = bool(NUMBER.match(cell)) and len(values) == 1 and _close(cell, mean)
                wrong = None if ok else f"{mean:+.4f} ± {std:.4f} over {len(values)}"
            if wrong:
                bad.append(f"{row[0]} | {head}: the page says {raw!r}, the files {wrong}")
    return bad


MARKED = [(p, t) for p in PAGES for t in _tables(p) if t[1]]


def test_every_table_of_paired_results_names_its_files():
    unmarked = [f"{p.relative_to(ROOT)}:{line}" for p in PAGES for line, kind, _, header, _ in _tables(p)
                if kind is None and any(k in " ".join(header) for k in ("± SE", "Δ", "seeds > 0"))]
    assert not unmarked, f"tables of paired results without a <!-- contrasts: ... --> marker: {unmarked}"
    assert any(p.name == "README.md" for p, _ in MARKED)  # the front door's headline table is checked
    assert sum(t[1] == "contrasts" for _, t in MARKED) >= 5 and sum(t[1] == "methods" for _, t in MARKED) >= 5


@pytest.mark.parametrize("page, table", MARKED, ids=[f"{p.relative_to(ROOT)}:{t[0]}" for p, t in MARKED])
def test_marked_tables_match_the_result_files(page, table):
    line, kind, sources, header, rows = table
    bad = (_check_contrasts if kind == "contrasts" else _check_methods)(sources, header, rows)
    assert rows and not bad, f"{page.relative_to(ROOT)}:{line} ({', '.join('+'.join(s) for s in sources)}):\n" + \
        "\n".join(bad)
