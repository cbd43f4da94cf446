"""Training frameworks (issue 26): parameters that loading creates, and warnings that point at the user's line
through Lightning Fabric, Lightning's Trainer, Accelerate and torch.amp's autocast.

The framework tests run for real where the framework is installed (the ``test`` extra installs both) and are
skipped otherwise. The teacher's comparison across ranks is tested in ``test_reliability.py`` (gloo ranks).
"""
import ast
import copy
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch

from _ddp_worker import TINY_SPLIT, gn_tiny, tiny_batch
from lrdet_core import BridgeDistiller, InputError

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = __file__
DOCS = Path(__file__).resolve().parents[1] / "docs"


def _distiller(**kw):
    """Student with 16 neck channels, teacher with 24: three 1x1 projectors (6 parameters); FGD adds GcBlocks."""
    return BridgeDistiller(gn_tiny(0, 16), gn_tiny(1, 24), split_points=TINY_SPLIT, alpha=1.0, **kw)


def _train(d, data, steps=1):
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        sum(d(data[0], data[1], hr_images=data[2], hr_targets=data[3]).values()).backward()
        opt.step()
    return d


@pytest.fixture(scope="module")
def checkpoint():
    """The state of a distiller (FGD: projectors and GcBlocks) after one step, and a batch."""
    data = tiny_batch(0, n=2)
    d = _distiller(loss="fgd").materialize(data[0], data[1], hr_images=data[2], hr_targets=data[3])
    return _train(d.train(), data).state_dict(), data


def _ours(record):
    return [w for w in record if str(w.message).startswith("LRDet:")]


def _assert_at_this_file(ours, *kinds):
    assert {k for w in ours for k in kinds if k in str(w.message)} == set(kinds), [str(w.message) for w in ours]
    assert all(w.filename == HERE for w in ours), [(w.filename, w.lineno, str(w.message)[:50]) for w in ours]


# --- parameters created by loading -------------------------------------------------------------------------
def test_parameters_created_by_loading_after_the_optimizer_is_built_are_named_in_a_warning(checkpoint):
    # Fabric and Accelerate build the optimizer before they load: what the load creates is not in it.
    state, _ = checkpoint
    d = _distiller(loss="fgd").train()
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        d.load_state_dict(state)
    ours = _ours(record)
    assert len(ours) == 1 and ours[0].filename == HERE, [(w.filename, str(w.message)) for w in record]
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    left_out = [n for n, p in d.named_parameters() if id(p) not in held]
    assert sum(n.startswith("projectors.") for n in left_out) == 6
    assert any(n.startswith("losses.teacher.gc_") for n in left_out)
    msg = str(ours[0].message)
    assert f"load_state_dict created {len(left_out)} parameters" in msg
    for owner in ("projectors.teacher_s4", "projectors.teacher_s8", "projectors.teacher_s16"):
        assert f"{owner} (2)" in msg
    gc = sum(n.startswith("losses.teacher.gc_student.") for n in left_out)
    assert f"losses.teacher.gc_student ({gc})" in msg and f"losses.teacher.gc_teacher ({gc})" in msg


def test_materialize_before_loading_creates_nothing_and_loads_every_value(checkpoint):
    # The documented order: build, materialize, optimizer, then load (also in the process that resumes).
    state, data = checkpoint
    d = _distiller(loss="fgd").materialize(data[0], data[1], hr_images=data[2], hr_targets=data[3]).train()
    params = [id(p) for p in d.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d.load_state_dict(state)
    assert [id(p) for p in d.parameters()] == params
    assert all(torch.equal(v, state[k]) for k, v in d.state_dict().items())


def test_copies_of_a_distiller_watch_their_own_parameters_when_loading(checkpoint):
    # An EMA (deepcopy) or a pickled copy loads checkpoints too: its watch must look at the copy's parameters (a
    # watch of the original would take every parameter of the copy for a new one), and pickling must work.
    state, data = checkpoint
    d = _distiller(loss="fgd").materialize(data[0], data[1], hr_images=data[2], hr_targets=data[3]).train()
    for c in (copy.deepcopy(d), pickle.loads(pickle.dumps(d))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            c.load_state_dict(state)
        assert all(torch.equal(v, state[k]) for k, v in c.state_dict().items())
    fresh = copy.deepcopy(_distiller(loss="fgd"))  # a copy of a distiller that never ran: loading creates
    with pytest.warns(UserWarning, match=r"load_state_dict created \d+ parameters"):
        fresh.load_state_dict(state)


def test_parameters_created_by_loading_under_a_process_group_raise(checkpoint, monkeypatch):
    # Under torch.distributed, DDP built before the load would never synchronise them: an error, as at a step.
    state, _ = checkpoint
    d = _distiller(loss="fgd").train()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with pytest.raises(InputError, match=r"but loading created \d+ in .*projectors\.teacher_s4 \(2\).*"
                                         r"call distiller\.materialize\(images, targets\) before loading"):
        d.load_state_dict(state)


# --- warnings at the user's line -------------------------------------------------------------------------
def test_warnings_point_at_the_users_line_through_torch_amp_autocast():
    # Accelerate's mixed precision wraps forward in torch.autocast used as a decorator: torch/amp frames.
    d = _distiller(hr_scale=2.0).train()
    d.forward = torch.autocast("cpu", dtype=torch.bfloat16)(d.forward)
    images, targets, hr, hr_targets = tiny_batch(0, n=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        d(images, targets, hr_images=hr, hr_targets=hr_targets)  # not materialized; hr_scale unused
    _assert_at_this_file(_ours(record), "created at the first training step", "hr_scale=2 is not used")


def test_warnings_point_at_the_users_line_through_lightning_fabric(checkpoint, tmp_path):
    pytest.importorskip("lightning")
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    d = _distiller(loss="fgd").train()
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    model, opt = fabric.setup(d, opt)  # the optimizer before the load: Fabric's order
    fabric.save(tmp_path / "ckpt.pt", {"model": checkpoint[0]})
    images, targets, hr, hr_targets = checkpoint[1]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fabric.load(tmp_path / "ckpt.pt", {"model": model})  # creates the projectors and GcBlocks
        loaded = _ours(record)
        fresh = _distiller(hr_scale=2.0).train()
        fabric.setup(fresh)(images, targets, hr_images=hr, hr_targets=hr_targets)  # through _FabricModule
    _assert_at_this_file(loaded, "load_state_dict created")
    _assert_at_this_file(_ours(record), "load_state_dict created", "created at the first training step",
                         "hr_scale=2 is not used")


def test_warnings_point_at_the_users_line_through_lightnings_trainer(checkpoint, tmp_path):
    pytest.importorskip("lightning")
    import lightning as L

    images, targets, hr, hr_targets = checkpoint[1]

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.distiller = _distiller(loss="fgd")

        def training_step(self, batch, batch_idx):
            return sum(self.distiller(images, targets, hr_images=hr, hr_targets=hr_targets).values())

        def validation_step(self, batch, batch_idx):
            self.distiller(images)

        def configure_optimizers(self):
            return torch.optim.SGD(self.distiller.parameters(), lr=0.1)

        def train_dataloader(self):
            return [0, 1]

        def val_dataloader(self):
            return [0]

    def trainer(steps):
        return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)

    first = trainer(1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first.fit(Module())  # no materialize in setup(): created at the first step, inside training_step
    _assert_at_this_file(_ours(record), "created at the first training step")
    assert {w.lineno for w in _ours(record)} == {Module.training_step.__code__.co_firstlineno + 1}
    first.save_checkpoint(tmp_path / "ckpt.ckpt")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(1).validate(Module(), ckpt_path=tmp_path / "ckpt.ckpt")  # the load creates them, in the Trainer
    _assert_at_this_file(_ours(record), "load_state_dict created")


@pytest.fixture
def accelerate_state():
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(True)  # a process-wide singleton: leave none behind for other tests


def test_warnings_point_at_the_users_line_through_accelerate_bf16(accelerate_state):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = accelerator.prepare(_distiller(hr_scale=2.0).train())
    images, targets, hr, hr_targets = tiny_batch(0, n=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model(images, targets, hr_images=hr, hr_targets=hr_targets)  # autocast + fp32 output conversion
    _assert_at_this_file(_ours(record), "created at the first training step", "hr_scale=2 is not used")


# --- the recipes in the docs ---------------------------------------------------------------------------------
def test_the_recipes_in_the_docs_compile_and_import_only_what_parts_py_defines():
    # Each page is self-contained, so parts.py appears on both: one text. Running the recipes takes two
    # processes and minutes (they were run by hand, see the pages); this keeps their text from rotting.
    blocks = {}
    for page in ("lightning.md", "accelerate.md"):
        found = re.findall(r'```python title="([^"]+)"\n(.*?)```\n', (DOCS / page).read_text(), re.S)
        assert found, page
        for name, body in found:
            assert blocks.setdefault(name, body) == body, f"{name} differs between the pages"
    assert set(blocks) == {"parts.py", "train_lightning.py", "train_fabric.py", "train_accelerate.py"}
    trees = {name: ast.parse(body, filename=name) for name, body in blocks.items()}
    defined = {n.name for n in trees["parts.py"].body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    for name, tree in trees.items():
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "parts"
                    for a in n.names}
        assert imported <= defined, (name, imported - defined)
        assert name == "parts.py" or imported, name
