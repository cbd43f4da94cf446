"""Compile every launched Triton kernel specialisation for real GPU targets and report ptxas usage.

Run as a script (``python tests/_compile_kernels.py [--arch 80 90] [--jobs 2]``); it prints one
JSON object per line: kernel module, kernel name, constexprs, dtype, arch, triton version,
registers, spill stores/loads, stack bytes and the widest global load/store in the PTX (bits).
No GPU is needed: ``triton.compile`` targets a ``GPUTarget`` and the PTX is assembled by the
``ptxas`` that ships with Triton. ``tests/test_kernels_compile.py`` runs it in a subprocess (one
per Triton install), so the kernels are real ``JITFunction`` objects even when another test
module imported them under ``TRITON_INTERPRET=1``.

The variant compiled is the one the JIT builds for a feature pyramid: pointers 16-byte aligned
(torch allocations) and every integer argument the kernel lets the JIT specialise divisible by
16 (``N C H W`` with ``C = 256``); arguments listed in the kernel's ``do_not_specialize`` get no
hint, as the JIT gives them none.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

MODULES = ("lrdet_core.kernels._common", "lrdet_core.kernels.mse", "lrdet_core.kernels.l1",
           "lrdet_core.kernels.cwd", "lrdet_core.kernels.fgd")


def _specs(module_name: str) -> list:
    mod = importlib.import_module(module_name)
    if module_name.endswith("_common"):
        return list(mod.specialisations())
    return list(mod.SPECIALISATIONS)


def _compile_one(job: tuple) -> dict:
    module_name, index, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = importlib.import_module(module_name)
    name, sig, const, num_warps = _specs(module_name)[index]
    fn = getattr(mod, name)
    generic = {p.name for p in fn.params if p.do_not_specialize}
    hinted = [i for i, (k, ty) in enumerate(sig.items())
              if ty.startswith("*") or (ty in ("i32", "i64") and k not in generic)]
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    compiled = triton.compile(ASTSource(fn, sig, const, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    regs = re.search(r"Used (\d+) registers", text)
    dtype = next((ty[1:] for k, ty in sig.items() if k in ("s_ptr", "s0")), "fp32")
    tdtype = next((ty[1:] for k, ty in sig.items() if k in ("t_ptr", "t0")), dtype)
    if tdtype != dtype:
        dtype = f"{dtype}+{tdtype}"  # student + teacher
    return {"module": module_name.rsplit(".", 1)[1], "kernel": name, "dtype": dtype, "triton": triton.__version__,
            "vector_bits": _vector_bits(compiled.asm["ptx"]),
            "constexprs": {k: (bool(v) if isinstance(v, bool) else v) for k, v in const.items()},
            "num_warps": num_warps, "arch": f"sm{arch}", "registers": int(regs.group(1)),
            "stack": int(spills.group(1)), "spill_stores": int(spills.group(2)), "spill_loads": int(spills.group(3))}


_ELEM_BITS = {"b8": 8, "b16": 16, "u16": 16, "b32": 32, "f32": 32, "u32": 32, "b64": 64, "u64": 64}


def _vector_bits(ptx: str) -> int:
    """The widest global load or store in the PTX, in bits (e.g. ``ld.global.v4.b32`` is 128)."""
    best = 0
    for m in re.finditer(r"\b(?:ld|st)\.global[\w.:]*?(?:\.v(\d))?\.(b8|b16|u16|b32|f32|u32|b64|u64)\b", ptx):
        best = max(best, int(m.group(1) or 1) * _ELEM_BITS[m.group(2)])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--modules", nargs="+", default=list(MODULES))
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces kernels by Python functions")
    jobs = [(m, i, a) for m in args.modules for i in range(len(_specs(m))) for a in args.arch]
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(_compile_one, jobs):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
