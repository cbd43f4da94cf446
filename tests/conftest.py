"""Session-wide test setup.

Triton decides when a kernel is decorated whether it will be interpreted, so the interpreter flag
must be set before any test module (or anything they import) loads triton. The compile test
clears it for its own subprocess.

Real kernels instead of the interpreter: with ``LRDET_NO_INTERPRET=1`` in the environment, or when
only the CUDA tests are selected (``-m cuda``) on a machine with CUDA, the flag is not set (and an
inherited one is removed), so ``tests/test_cuda.py`` launches compiled kernels on the GPU. Modules
that need the interpreter are then not collected when a directory is collected (pytest never ignores a
file named on the command line): importing ``tests/test_kernels.py`` would set the flag and reload the
kernels as interpreted functions for the whole process.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

#: Test modules that run the kernels through the interpreter on CPU tensors.
INTERPRETER_ONLY = ("test_kernels.py",)


def _real_kernels(config) -> bool:
    if os.environ.get("LRDET_NO_INTERPRET", "") == "1":
        return True
    if (config.getoption("markexpr", default="") or "").strip() != "cuda":
        return False
    import torch  # only for `-m cuda`: torch does not load triton on import

    return torch.cuda.is_available()


def _offline_ultralytics() -> None:
    """Ultralytics never reaches the network in the tests: ``YOLO_OFFLINE`` (no update check), and a config folder of
    the session's own holding a stand-in ``Arial.ttf`` (matplotlib's DejaVu Sans): Ultralytics checks for that font
    whenever it checks a dataset, and downloads it when it is missing. Set before anything imports ultralytics."""
    import shutil
    import tempfile

    os.environ["YOLO_OFFLINE"] = "1"
    if "YOLO_CONFIG_DIR" in os.environ:
        return
    folder = tempfile.mkdtemp(prefix="lrdet-ultralytics-")
    os.makedirs(os.path.join(folder, "Ultralytics"))  # Ultralytics' config folder is $YOLO_CONFIG_DIR/Ultralytics
    try:
        import matplotlib

        font = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            shutil.copyfile(font, os.path.join(folder, "Ultralytics", name))
    except (ImportError, OSError):
        pass
    os.environ["YOLO_CONFIG_DIR"] = folder


def pytest_configure(config):
    # Runs before any test module is imported (collection comes after configuration).
    _offline_ultralytics()
    config.lrdet_real_kernels = _real_kernels(config)
    if config.lrdet_real_kernels:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_ignore_collect(collection_path, config):
    if getattr(config, "lrdet_real_kernels", False) and collection_path.name in INTERPRETER_ONLY:
        return True
    return None


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: tiny models run several times faster with one thread than
    with two on a shared 2-core machine (modules opt in with ``pytestmark``)."""
    import torch  # not at the top: this file sets the Triton environment before anything imports torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
