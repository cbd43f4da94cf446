"""Every Triton specialisation the kernels launch compiles for sm80 and sm90 without spills.

No GPU is needed: ``tests/_compile_kernels.py`` calls ``triton.compile`` with a ``GPUTarget``
and assembles the PTX with Triton's own ``ptxas -v``. It runs in a subprocess so that the
kernels are real ``JITFunction`` objects even though ``tests/test_kernels.py`` imports them
under ``TRITON_INTERPRET=1`` in this process.

It runs once per Triton install found: the environment's own, and a second one shadowing it
from the directory in ``LRDET_TRITON_ALT`` (default ``~/.cache/lrdet-core/triton36``, which
``.ci/run`` fills with ``pip install --no-deps --target DIR triton==3.6.0``); a missing one is skipped.
Only compilation is checked under the second install (triton 3.6's interpreter does not run
with numpy 2).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
MAX_REGISTERS = 255  # per thread on sm80/sm90; beyond it ptxas spills
ALT = os.environ.get("LRDET_TRITON_ALT", os.path.expanduser("~/.cache/lrdet-core/triton36"))
INSTALLS = ["env", "alt"]


def _compile(install: str) -> list:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [str(ROOT), env.get("PYTHONPATH", "")]
    if install == "alt":
        if not (Path(ALT) / "triton" / "__init__.py").is_file():
            pytest.skip(f"no second triton install at {ALT} (set LRDET_TRITON_ALT)")
        paths.insert(0, ALT)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "_compile_kernels.py"), "--arch", *map(str, ARCHS),
                          "--jobs", "2"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=3000)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    for r in rows:  # visible with -s; the numbers quoted in the kernel docs come from here
        print(f"triton {r['triton']} {r['arch']} {r['module']:>7} {r['kernel']:<22} {r['dtype']:<9} {r['constexprs']} "
              f"warps={r['num_warps']} regs={r['registers']} spills={r['spill_stores']}/{r['spill_loads']} "
              f"vector={r['vector_bits']}b")
    return rows


_REPORTS: dict = {}


@pytest.fixture(scope="module", params=INSTALLS)
def report(request) -> list:
    if request.param not in _REPORTS:
        _REPORTS[request.param] = _compile(request.param)
    return _REPORTS[request.param]


@pytest.mark.slow
def test_every_specialisation_compiles(report):
    from lrdet_core.kernels import _common, cwd, fgd, l1, mse

    expected = (len(_common.specialisations()) + len(mse.SPECIALISATIONS) + len(l1.SPECIALISATIONS)
                + len(cwd.SPECIALISATIONS) + len(fgd.SPECIALISATIONS)) * len(ARCHS)
    assert len(report) == expected


@pytest.mark.slow
def test_no_spills(report):
    bad = [r for r in report if r["spill_stores"] or r["spill_loads"] or r["registers"] > MAX_REGISTERS]
    assert not bad, f"kernels that spill: {bad}"


@pytest.mark.slow
def test_unit_stride_streams_use_vector_loads(report):
    # Every kernel that streams features (all but the three small combining kernels) must get
    # 128-bit accesses in the variant the JIT builds for a pyramid.
    narrow = [r for r in report if r["kernel"] not in ("_sum_partials_kernel", "_cwd_cl_combine_kernel", "_fgd_combine_kernel")
              and r["vector_bits"] < 128]
    assert not narrow, f"kernels without 128-bit accesses: {narrow}"
