"""Session-wide test setup.

Triton decides when a kernel is decorated whether it will be interpreted, so the interpreter flag
must be set before any test module (or anything they import) loads triton. The compile test
clears it for its own subprocess.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))
