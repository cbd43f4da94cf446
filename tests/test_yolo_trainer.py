"""LRDet through Ultralytics' own ``YOLO(...).train(trainer=lrdet_trainer(...))``, offline, as its users run it.

Tiny YOLO models (1/16 of n's width) on a tiny generated dataset: LR ``imgsz=64``, HR view 128 (``hr_scale=2``).
"""
import io
import json
import logging
import os
import pickletools
import socket
import subprocess
import sys
import zipfile

import pytest
import torch

pytest.importorskip("ultralytics")
os.environ["YOLO_OFFLINE"] = "1"
import cv2  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402
from ultralytics.utils import DEFAULT_CFG_DICT, LOGGER  # noqa: E402

from lrdet_core import BridgeDistiller  # noqa: E402
from lrdet_core.adapters.ultralytics import save_checkpoint  # noqa: E402
from lrdet_core.errors import InputError  # noqa: E402
from lrdet_core.integrations.ultralytics import LRDetTrainer, area_resize, lrdet_trainer  # noqa: E402
from lrdet_core.integrations.ultralytics_model import LRDetModel, StudentEMA  # noqa: E402
from tiny_yolo import write_dataset, write_model_yaml  # noqa: E402

TRAIN = dict(imgsz=64, batch=4, device="cpu", plots=False, workers=0, exist_ok=True, verbose=False, seed=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The dataset, the tiny model yamls and a teacher checkpoint (YOLOv8 at twice the students' width, saved as
    Ultralytics saves a model trained at 128 px)."""
    root = tmp_path_factory.mktemp("yolo_trainer")
    data = write_dataset(root / "data")
    yamls = {f: write_model_yaml(root, f) for f in ("yolov8", "yolo11", "yolo26")}
    (root / "teacher").mkdir()
    teacher_yaml = write_model_yaml(root / "teacher", "yolov8", width=0.125)
    torch.manual_seed(1)
    teacher = DetectionModel(str(teacher_yaml), nc=2, verbose=False)
    ckpt = save_checkpoint(teacher, root / "teacher.pt", train_args={**DEFAULT_CFG_DICT, "imgsz": 128, "task": "detect"})
    return {"root": root, "data": str(data), "yamls": yamls, "teacher": str(ckpt)}


class NetworkGuard:
    """Records (and refuses) every attempt to open a network connection."""

    def __init__(self, monkeypatch):
        self.attempts = []

        def refuse(*args, **kwargs):
            self.attempts.append(args[1:] if len(args) > 1 else args)
            raise OSError("network disabled in tests")
        monkeypatch.setattr(socket.socket, "connect", refuse)
        monkeypatch.setattr(socket, "getaddrinfo", refuse)


def train(files, name, family="yolov8", callbacks=(), **kw):
    """``YOLO(<family>t.yaml).train(trainer=...)``; returns the YOLO object and the trainer."""
    model = YOLO(str(files["yamls"][family]))
    seen = {}
    model.add_callback("on_train_end", lambda tr: seen.setdefault("trainer", tr))
    for event, cb in callbacks:
        model.add_callback(event, cb)
    options = {k: kw.pop(k) for k in list(kw) if k in ("alpha", "inherit", "loss", "check_finite")}
    trainer = lrdet_trainer(files["teacher"], hr_scale=2.0, **options)
    model.train(data=files["data"], project=str(files["root"] / "runs"), name=name, trainer=trainer,
                **{**TRAIN, **kw})
    return model, seen.get("trainer")


@pytest.fixture(scope="module")
def trained(files):
    """One run: a YOLOv8 student, 2 epochs, alpha='auto', a checkpoint every epoch; no network."""
    mp = pytest.MonkeyPatch()
    guard = NetworkGuard(mp)
    try:
        model, trainer = train(files, "v8", epochs=2, save_period=1, alpha="auto")
    finally:
        mp.undo()
    return model, trainer, guard.attempts


def pickled_globals(path):
    """The module names of every class and function a torch checkpoint's pickle refers to."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    names, strings = set(), []
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        if op.name in ("GLOBAL", "INST"):
            names.add(arg.split(" ")[0])
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            names.add(strings[-2])
    return names


def family_teacher(files, family):
    """A teacher checkpoint of the student's family (its tiny width, trained at 128 px as far as its args say)."""
    path = files["root"] / f"teacher_{family}.pt"
    if not path.exists():
        torch.manual_seed(2)
        model = DetectionModel(str(files["yamls"][family]), nc=2, verbose=False)
        save_checkpoint(model, path, train_args={**DEFAULT_CFG_DICT, "imgsz": 128, "task": "detect"})
    return str(path)


@pytest.mark.parametrize("family", ["yolov8", "yolo11", "yolo26"])
def test_the_n_students_of_each_family_train_one_epoch_and_best_pt_is_plain(files, family):
    model = YOLO(f"{family}n.yaml")
    seen = {}
    model.add_callback("on_train_end", lambda tr: seen.setdefault("trainer", tr))
    model.train(data=files["data"], project=str(files["root"] / "runs"), name=f"n_{family}", epochs=1,
                trainer=lrdet_trainer(family_teacher(files, family), hr_scale=2.0, inherit=True), **TRAIN)
    trainer = seen["trainer"]
    third = "l1" if family == "yolo26" else "dfl"  # YOLO26's E2ELoss: an L1 box term (reg_max 1) in place of DFL
    assert trainer.loss_names == tuple(f"{k}/{n}" for k in ("lr", "bridge") for n in ("box", "cls", third)) + (
        "distill/mse",)
    if family == "yolo26":  # the trainer's end-of-epoch criterion.update() reached the criterion LRDet's passes use
        crit = trainer._lrdet_model.student.criterion
        assert type(crit).__name__ == "E2ELoss" and crit.updates == 1 and trainer._lrdet_model.criterion is crit
    assert not [m for m in pickled_globals(trainer.best) if m.startswith("lrdet_core")]
    reloaded = YOLO(str(trainer.best))  # what model.train() itself reloads at the end
    assert type(model.model) is type(reloaded.model) is DetectionModel and model.model.yaml["backbone"] == \
        reloaded.model.yaml["backbone"] == trainer._lrdet_model.student.yaml["backbone"]


# --- what a run leaves behind -----------------------------------------------------------------------------------
def test_the_terms_are_the_progress_columns_and_results_csv_and_validation_has_the_lr_ones(trained):
    _, trainer, _ = trained
    assert list(trainer.loss_names) == ["lr/box", "lr/cls", "lr/dfl", "bridge/box", "bridge/cls", "bridge/dfl",
                                        "distill/mse"]
    header, *rows = (trainer.save_dir / "results.csv").read_text().splitlines()
    cols = header.split(",")
    assert [c for c in cols if c.startswith("train/")] == [f"train/{n}" for n in trainer.loss_names]
    assert [c for c in cols if c.startswith("val/")] == ["val/lr/box", "val/lr/cls", "val/lr/dfl"]
    last = dict(zip(cols, map(float, rows[-1].split(","))))
    for n in trainer.loss_names:  # the last epoch's running means, as Ultralytics writes its own
        assert last[f"train/{n}"] == pytest.approx(float(trainer.tloss[n]), rel=1e-4, abs=1e-5)


def test_the_train_set_is_read_at_hr_and_validation_at_lr(trained):
    _, trainer, _ = trained
    assert trainer.train_loader.dataset.imgsz == 128
    assert trainer.test_loader.dataset.imgsz == 64
    assert trainer.args.imgsz == 64


@pytest.mark.parametrize("name", ["last.pt", "best.pt", "epoch0.pt", "epoch1.pt"])
def test_every_checkpoint_holds_the_plain_student_and_no_teacher(trained, files, name):
    model, trainer, _ = trained
    path = trainer.wdir / name
    assert not [m for m in pickled_globals(path) if m.startswith("lrdet_core")]
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    student = trainer._lrdet_model.student
    ema = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    assert type(ema) is DetectionModel
    assert list(ema.state_dict()) == list(student.state_dict())  # the student's tensors, each once
    assert sum(p.numel() for p in ema.parameters()) == sum(p.numel() for p in student.parameters())
    assert ckpt["train_args"]["imgsz"] == 64
    if name == "last.pt":  # LRDet's own state, for resume: the projectors (n vs a wider teacher), the auto alpha
        own = {k: v for k, v in trainer._lrdet_model.distiller.state_dict().items() if not k.startswith("student.")}
        assert any(k.startswith("projectors.") for k in own) and "auto_alpha" in own
        assert set(ckpt["lrdet"]["state"]) == set(own)
        for k, v in own.items():
            assert torch.equal(ckpt["lrdet"]["state"][k], v.cpu())
        assert ckpt["lrdet"]["config"]["hr_scale"] == 2.0
    else:
        assert "lrdet" not in ckpt


def test_best_pt_loads_and_predicts_where_lrdet_core_cannot_be_imported(trained):
    _, trainer, _ = trained
    code = ("import sys, numpy as np; sys.modules['lrdet_core'] = None\n"
            "from ultralytics import YOLO\n"
            f"m = YOLO({str(trainer.best)!r})\n"
            "r = m.predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, verbose=False)\n"
            "print(type(m.model).__name__, m.overrides['imgsz'], len(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "YOLO_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["DetectionModel", "64", "1"]


def test_nothing_is_downloaded(trained):
    assert trained[2] == []


def test_the_ema_averages_the_student_alone_each_tensor_once():
    torch.manual_seed(0)
    student, teacher = DetectionModel("yolov8n.yaml", nc=2, verbose=False), DetectionModel("yolov8s.yaml", nc=2,
                                                                                           verbose=False)
    model = LRDetModel(BridgeDistiller(student, teacher, hr_scale=2.0))
    assert len(model.distiller.projectors.state_dict()) > 0  # n and s differ in width: LRDet has tensors of its own
    ema = StudentEMA(model, tau=1)
    before = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema.update(model)
    d = ema.decay(1)
    assert list(ema.ema.state_dict()) == list(student.state_dict())
    for k, v in ema.ema.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, d * before[k] + (1 - d) * student.state_dict()[k], rtol=1e-6, atol=1e-6)


# --- the two views ----------------------------------------------------------------------------------------------
def configured(files, **overrides):
    """A configured trainer, not trained (``stride`` as ``_setup_train`` sets it)."""
    T = lrdet_trainer(files["teacher"], hr_scale=2.0)
    trainer = T(overrides={"model": str(files["yamls"]["yolov8"]), "data": files["data"],
                           "project": str(files["root"] / "runs"), "name": "unit", **TRAIN, **overrides})
    trainer.stride = 32
    return trainer


def uint8_batch(n=2, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"img": torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
            "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [1.0]]),
            "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.4, 0.1, 0.1]])}


def deployment_resize(img_uint8, h, w):
    """What Ultralytics' loader does to shrink an image for val and predict: cv2's INTER_AREA, HWC uint8."""
    arr = cv2.resize(img_uint8.permute(1, 2, 0).numpy(), (w, h), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("scale,lr", [(2.0, 64), (4 / 3, 96)])
def test_the_lr_view_is_the_hr_view_shrunk_as_deployment_shrinks_images(files, scale, lr):
    trainer = configured(files)
    trainer.lrdet_config = lrdet_trainer(files["teacher"], hr_scale=scale).lrdet_config
    raw = uint8_batch()
    batch = trainer.preprocess_batch({k: v.clone() for k, v in raw.items()})
    torch.testing.assert_close(batch["hr_img"], raw["img"].float() / 255)
    assert batch["img"].shape == (2, 3, lr, lr)
    for i in range(2):  # cv2 rounds to uint8: within half a level
        torch.testing.assert_close(batch["img"][i], deployment_resize(raw["img"][i], lr, lr), atol=0.5 / 255 + 1e-6,
                                   rtol=0)
    torch.testing.assert_close(batch["bboxes"], raw["bboxes"])  # normalised: the same boxes for both views


def test_multi_scale_draws_one_size_and_keeps_the_two_views_one_image(files):
    trainer = configured(files, multi_scale=0.5)
    sizes = set()
    for seed in range(6):
        import random
        random.seed(seed)
        batch = trainer.preprocess_batch(uint8_batch(seed=seed))
        h = batch["img"].shape[-1]
        sizes.add(h)
        assert h % 32 == 0 and batch["hr_img"].shape[-2:] == (2 * h, 2 * h)
        torch.testing.assert_close(batch["img"], area_resize(batch["hr_img"], (h, h)))
    assert len(sizes) > 1


def test_the_lr_terms_are_the_students_own_losses_on_the_lr_view(files):
    trainer = configured(files)
    torch.manual_seed(0)
    student = DetectionModel(str(files["yamls"]["yolov8"]), nc=2, verbose=False)
    student.args = trainer.args
    teacher = YOLO(files["teacher"]).model
    model = LRDetModel(BridgeDistiller(student, teacher, alpha=1.0)).train()
    batch = trainer.preprocess_batch(uint8_batch())
    vec, items = model(batch)
    own_vec, own = student.loss({k: batch[k] for k in ("img", "batch_idx", "cls", "bboxes")})
    for k in ("box", "cls", "dfl"):
        torch.testing.assert_close(items[f"lr/{k}"], own[f"{k}_loss"])
    torch.testing.assert_close(vec[:3], own_vec)
    assert vec.shape == (7,) and torch.isfinite(vec).all()


# --- configuration ----------------------------------------------------------------------------------------------
def test_compile_is_switched_off_with_one_message(files):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    LOGGER.addHandler(handler)
    try:
        trainer = configured(files, compile=True)
    finally:
        LOGGER.removeHandler(handler)
    assert trainer.args.compile is False
    assert len([r for r in records if r.levelno >= logging.WARNING and "compile" in r.getMessage()]) == 1


def test_bad_configurations_are_clear_errors(files):
    with pytest.raises(InputError, match="did you mean alpha"):
        lrdet_trainer(files["teacher"], alhpa=0.1)
    with pytest.raises(InputError, match="not a file"):
        lrdet_trainer(str(files["root"] / "missing.pt"))
    with pytest.raises(InputError, match="hr_scale >= 1"):
        lrdet_trainer(files["teacher"], hr_scale=0.5)
    with pytest.raises(InputError, match="bare LRDetTrainer"):
        LRDetTrainer(overrides={"data": files["data"]})
    with pytest.raises(InputError, match="one distillation"):
        configured(files, distill_model=files["teacher"])
    trainer = configured(files)
    trainer.lrdet_config = lrdet_trainer(files["teacher"], hr_scale=1.4).lrdet_config
    with pytest.raises(InputError, match=r"multiple of the stride 32, but 64 \* 1.4 = 89.6"):
        trainer.hr_imgsz()


REBUILD = """
import json, sys
from ultralytics.utils import DEFAULT_CFG_DICT
from ultralytics.utils.patches import torch_load
state = torch_load(sys.argv[1], map_location="cpu")  # as Ultralytics' generated DDP script does, in a new process
trainer = state["trainer"](cfg={**DEFAULT_CFG_DICT, "save_dir": ""}, overrides=state["args"],
                           _callbacks=state["callbacks"])
cfg = trainer.lrdet_config
t = cfg.teacher if isinstance(cfg.teacher, str) else float(sum(v.double().sum() for v in cfg.teacher.state_dict().values()))
print(json.dumps({"class": type(trainer).__mro__[1].__name__, "teacher": t, "hr_scale": cfg.hr_scale,
                  "options": cfg.options}))
"""


def test_the_ddp_state_file_rebuilds_the_configured_trainer_in_a_new_process(files):
    pytest.importorskip("cloudpickle")
    from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file

    torch.manual_seed(3)
    module_teacher = DetectionModel("yolov8n.yaml", nc=2, verbose=False)
    checksum = float(sum(v.double().sum() for v in module_teacher.state_dict().values()))
    for teacher, options, expected in ((files["teacher"], {"loss": "cwd", "alpha": 0.3, "inherit": True},
                                        files["teacher"]), (module_teacher, {"alpha": "auto"}, checksum)):
        T = lrdet_trainer(teacher, hr_scale=2.0, **options)
        trainer = T(overrides={"model": str(files["yamls"]["yolov8"]), "data": files["data"],
                               "project": str(files["root"] / "runs"), "name": "ddp", **TRAIN})
        file = generate_ddp_file(trainer)
        try:
            out = subprocess.run([sys.executable, "-c", REBUILD, str(file).replace(".py", ".pt")], capture_output=True,
                                 text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        finally:
            ddp_cleanup(trainer, file)
        assert out.returncode == 0, out.stderr[-2000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got == {"class": "LRDetTrainer", "teacher": expected, "hr_scale": 2.0, "options": options}


# --- resume and NaN recovery --------------------------------------------------------------------------------------
class Stop(Exception):
    pass


def test_resume_rebuilds_the_distiller_restores_lrdet_state_and_does_not_inherit_again(files):
    first = {}

    def stop_after_first_epoch(tr):
        first["alphas"] = tr._lrdet_model.distiller.alphas
        raise Stop
    with pytest.raises(Stop):
        train(files, "resume", epochs=3, alpha="auto", inherit=True,
              callbacks=[("on_fit_epoch_end", stop_after_first_epoch)])
    last = files["root"] / "runs" / "resume" / "weights" / "last.pt"
    saved = torch.load(last, map_location="cpu", weights_only=False)["ema"].float().state_dict()

    seen = {}

    def at_start(tr):
        d = tr._lrdet_model.distiller
        seen.update(start=tr.start_epoch, alphas=d.alphas, student={k: v.clone() for k, v in d.student.state_dict().items()})
    model = YOLO(str(last))
    model.add_callback("on_train_start", at_start)
    model.train(resume=True, trainer=lrdet_trainer(files["teacher"], hr_scale=2.0, alpha="auto", inherit=True))
    assert seen["start"] == 1
    assert first["alphas"]["teacher"] is not None and seen["alphas"] == first["alphas"]  # restored, not measured
    for k, v in saved.items():  # the student resumes from last.pt's EMA, not from the teacher's weights again
        if v.dtype.is_floating_point:
            torch.testing.assert_close(seen["student"][k].float(), v, atol=0, rtol=0)


def test_a_nan_term_reaches_ultralytics_own_recovery(files):
    state = {"hooked": False, "poison": False, "fired": 0}
    records = []
    handler = logging.Handler()
    handler.emit = records.append

    def poison(module, inputs, output):
        return output * float("nan") if state["poison"] else None

    def before_batch(tr):
        if not state["hooked"]:
            tr._lrdet_model.distiller.teacher.model[0].register_forward_hook(poison)
            state["hooked"] = True
        # the last batch of the second epoch, once: Ultralytics checks the epoch's last loss
        state["poison"] = tr.epoch == 1 and state["fired"] == 1
        state["fired"] += tr.epoch == 1

    LOGGER.addHandler(handler)
    try:
        with pytest.warns(UserWarning, match="distill/mse"):
            _, trainer = train(files, "nan", epochs=3, alpha=1e-3, callbacks=[("on_train_batch_start", before_batch)])
    finally:
        LOGGER.removeHandler(handler)
    assert any("recovering from last.pt" in r.getMessage() for r in records)
    assert trainer.nan_recovery_attempts == 0 and trainer.epoch == 2  # recovered, then finished
    for v in trainer._lrdet_model.student.state_dict().values():
        assert torch.isfinite(v.float()).all()


# --- CUDA --------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_amp_on_cuda_trains_the_distiller_in_mixed_precision_and_saves_a_plain_float_student(files, monkeypatch):
    from ultralytics.utils import WEIGHTS_DIR

    # Ultralytics' AMP check runs yolo26n.pt, downloading it when missing: a local one (untrained) keeps it offline.
    if not (WEIGHTS_DIR / "yolo26n.pt").exists():
        WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        save_checkpoint(DetectionModel("yolo26n.yaml", nc=80, verbose=False), WEIGHTS_DIR / "yolo26n.pt")
    guard = NetworkGuard(monkeypatch)
    seen = {}

    def after_batch(tr):
        seen.setdefault("dtypes", {k: v.dtype for k, v in tr.loss_items.items()})
        seen.setdefault("scale", tr.scaler.get_scale() if tr.scaler.is_enabled() else None)
    _, trainer = train(files, "amp", epochs=1, device=0, amp=True, callbacks=[("on_train_batch_end", after_batch)])
    assert guard.attempts == []
    assert trainer.amp is True and seen["scale"] is not None  # fp16 autocast with a GradScaler
    assert set(seen["dtypes"].values()) == {torch.float32}
    ckpt = torch.load(trainer.best, map_location="cpu", weights_only=False)
    assert type(ckpt["model"]) is DetectionModel and not [m for m in pickled_globals(trainer.best)
                                                          if m.startswith("lrdet_core")]
    for v in trainer._lrdet_model.student.state_dict().values():
        assert torch.isfinite(v.float()).all()
