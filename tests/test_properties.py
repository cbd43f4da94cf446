"""Property-based checks (hypothesis): bad and odd input gives a correct result or one library error.

Never a raw RuntimeError/AssertionError from deep inside torch, never a silently wrong result.
Examples are few and the models tiny; every test builds its models once.
"""
import functools
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lrdet_core import (BridgeDistiller, InputError, LevelMatchError, LRDetError, SplitPointError, SplitPoints,
                        resample_to_hr)
from tiny import TinyDetector, retinanet

TINY_SPLIT = SplitPoints(backbone="backbone", neck="neck")
FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def _retinanet_distiller():
    # Student at 48 px (canvases of at least 32 x 64 for aspect ratios within [1/2, 2], so the
    # student's own BatchNorm has 2 values per channel at stride 32 even for one image), teacher at 96.
    torch.manual_seed(0)
    student, teacher = retinanet(size=48, channels=16), retinanet(size=96, channels=16)
    return BridgeDistiller(student, teacher, loss="fgd").train()


@functools.lru_cache(maxsize=None)
def _tiny_distiller(loss="mse"):
    torch.manual_seed(0)
    return BridgeDistiller(TinyDetector(), TinyDetector(neck_channels=24), split_points=TINY_SPLIT, loss=loss)


_KINDS = ["ok", "ok", "outside", "degenerate", "inverted", "nan"]


@st.composite
def _image_and_boxes(draw):
    h = draw(st.integers(24, 80))
    w = draw(st.integers(max(24, (h + 1) // 2), min(80, 2 * h)))
    boxes, kinds = [], draw(st.lists(st.sampled_from(_KINDS), max_size=3))
    for kind in kinds:
        x1, y1 = draw(st.floats(0, w - 4)), draw(st.floats(0, h - 4))
        bw, bh = draw(st.floats(2, w)), draw(st.floats(2, h))
        box = {"ok": [x1, y1, x1 + bw, y1 + bh], "outside": [w + x1, y1, w + x1 + bw, y1 + bh],
               "degenerate": [x1, y1, x1, y1 + bh], "inverted": [x1 + bw, y1, x1, y1 + bh],
               "nan": [x1, float("nan"), x1 + bw, y1 + bh]}[kind]
        boxes.append(box)
    return (h, w), boxes, kinds


@given(st.lists(_image_and_boxes(), min_size=1, max_size=3), st.integers(0, 2 ** 16))
@example([((40, 60), [], []), ((50, 30), [[1.0, 2.0, 20.0, 20.0], [70.0, 5.0, 90.0, 9.0]], ["ok", "outside"])], 0)
@FEW
def test_torchvision_random_batches_sizes_and_boxes(items, seed):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, h, w, generator=g) for (h, w), _, _ in items]
    targets = [{"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.ones(len(boxes), dtype=torch.int64)} for _, boxes, _ in items]
    bad = [(i, j) for i, (_, _, kinds) in enumerate(items) for j, k in enumerate(kinds)
           if k in ("degenerate", "inverted", "nan")]
    d = _retinanet_distiller()
    if bad:
        i, j = bad[0]
        with pytest.raises(InputError, match=rf"targets\[{i}\]\['boxes'\]\[{j}\]"):
            d(images, targets)
        return
    out = d(images, targets)  # empty targets and boxes off the image included
    assert set(out) == {"lr/classification", "lr/bbox_regression", "bridge/classification",
                        "bridge/bbox_regression", "distill/fgd"}
    assert all(v.dim() == 0 and bool(torch.isfinite(v)) for v in out.values())
    assert out["distill/fgd"] > 0
    ref = d.student(images, targets)  # the LR pass is the student's own train-mode forward
    for k, v in ref.items():
        torch.testing.assert_close(out[f"lr/{k}"], v, rtol=1e-5, atol=1e-6, msg=k)


_BAD = {"degenerate": [3.0, 2.0, 3.0, 9.0], "inverted": [9.0, 2.0, 3.0, 9.0], "nan": [3.0, float("nan"), 9.0, 9.0]}


_SIDE = st.integers(24, 48).filter(lambda v: v != 33)


@given(n=st.integers(1, 3), h=_SIDE, w=_SIDE,
       scale=st.sampled_from([1.0, 1.5, 2.0, 3.0]), loss=st.sampled_from(["mse", "fgd"]), empty=st.booleans(),
       bad=st.sampled_from([None, None, None, "degenerate", "inverted", "nan"]), bad_in=st.sampled_from(["lr", "hr"]),
       bad_image=st.integers(0, 2))
@example(n=2, h=24, w=48, scale=2.0, loss="mse", empty=False, bad=None, bad_in="lr", bad_image=0)
@example(n=2, h=40, w=30, scale=1.5, loss="fgd", empty=False, bad="degenerate", bad_in="hr", bad_image=1)
@example(n=3, h=32, w=32, scale=3.0, loss="mse", empty=True, bad="nan", bad_in="lr", bad_image=2)
@FEW
def test_custom_model_random_sizes_and_scales(n, h, w, scale, loss, empty, bad, bad_in, bad_image):
    # Sides of 24-48 px but 33: there every level's stride reads unambiguously off the canvas. At 17-22 px and
    # at 33 px the stride-16 level has 2 or 3 cells of 11 px or less, nearer to stride 8; the distiller then
    # raises (test_ambiguous_strides_on_a_small_canvas_are_a_clear_error), for every scale (checked on the
    # whole grid of sides 12-48 and the scales below).
    d = _tiny_distiller(loss).train()
    images = torch.rand(n, 3, h, w)
    boxes = torch.zeros(0, 4) if empty else torch.tensor([[1.0, 2.0, w / 2 + 1, h / 2 + 2]])
    targets = [{"boxes": boxes} for _ in range(n)]
    hr = torch.nn.functional.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
    hr_targets = [{"boxes": boxes * scale} for _ in range(n)]
    if bad is not None:  # one bad box, after the good ones, in one image of the LR or the HR targets
        i = bad_image % n
        where = targets if bad_in == "lr" else hr_targets
        where[i] = {"boxes": torch.cat([where[i]["boxes"], torch.tensor([_BAD[bad]])])}
        name = "targets" if bad_in == "lr" else "hr_targets"
        with pytest.raises(InputError, match=rf"{name}\[{i}\]\['boxes'\]\[{len(boxes)}\]"):
            d(images, targets, hr_images=hr, hr_targets=hr_targets)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # parameters created at the first step
        out = d(images, targets, hr_images=hr, hr_targets=hr_targets)
    assert set(out) == {"lr/heat", "bridge/heat", f"distill/{loss}"}
    assert all(bool(torch.isfinite(v)) for v in out.values())
    torch.testing.assert_close(out["lr/heat"], d.student(images, targets)["heat"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("h,w", [(20, 20), (33, 24)])
def test_ambiguous_strides_on_a_small_canvas_are_a_clear_error(h, w):
    # The stride-16 level has 2 cells of 10 px, or 3 of 11 px: nearer to stride 8, so two levels claim stride 8.
    d = _tiny_distiller("mse").train()
    images, boxes = torch.rand(2, 3, h, w), torch.tensor([[1.0, 2.0, 11.0, 12.0]])
    with pytest.raises(LevelMatchError, match=r"expected one student level per stride, but levels 'p1' and 'p2' "
                                              r"both have stride 8"):
        d(images, [{"boxes": boxes}] * 2, hr_images=images.clone(), hr_targets=[{"boxes": boxes}] * 2)


@given(keep=st.lists(st.sampled_from(["p0", "p1", "p2"]), unique=True, max_size=3),
       resize=st.sampled_from([None, "p0", "p2"]))
@example(keep=["p0", "p2"], resize=None)
@example(keep=["p0", "p1", "p2"], resize=None)
@FEW
def test_mismatched_pyramid_levels(keep, resize):
    torch.manual_seed(0)
    teacher = TinyDetector()

    def edit(m, inputs, output):
        out = {k: v for k, v in output.items() if k in keep}
        if resize in out:  # a level at the right stride with the wrong spatial size
            out[resize] = out[resize][..., :-1, :]
        return out

    seen, values = [], []

    def recording(s, t, ctx):
        seen.append(list(ctx.level_names))
        values.append(sum((a - b).square().sum() for a, b in zip(s, t)))
        return values[-1]

    teacher.neck.register_forward_hook(edit)
    d = BridgeDistiller(TinyDetector(), teacher, split_points=TINY_SPLIT, hr_scale=2.0, loss=recording,
                        alpha=None).train()  # None: the recommended alpha, 1 for a callable
    images, targets = torch.rand(2, 3, 64, 64), [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]])}] * 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if not keep or resize in keep:  # nothing to pair, or a pair of different sizes
            with pytest.raises(LRDetError, match="expected the teacher's neck split point|same batch and spatial size"):
                d(images, targets)
            return
        out = d(images, targets)
        d(images, targets)  # reported once per distiller, not at every step
    assert seen == [sorted(keep)] * 2
    assert torch.equal(out["distill/recording"], values[0])  # alpha = 1 for a callable
    # Levels without a partner are reported, naming their strides (p0, p1, p2 are strides 4, 8, 16).
    unpaired = sorted({"p0": 4, "p1": 8, "p2": 16}[k] for k in {"p0", "p1", "p2"} - set(keep))
    reports = [str(w.message) for w in caught if "no partner" in str(w.message)]
    if unpaired:
        assert len(reports) == 1 and f"levels with stride {unpaired} have no partner" in reports[0], reports
    else:
        assert reports == []


@given(junk=st.one_of(st.none(), st.integers(), st.text(max_size=3),
                      st.lists(st.integers(), min_size=1, max_size=2),
                      st.sampled_from(["3d", "dict_of_str", "empty_list", "mixed"])))
@example(junk=None)
@FEW
def test_non_tensor_split_point_outputs(junk):
    made = {"3d": lambda: torch.zeros(2, 8, 4), "dict_of_str": lambda: {"a": "b"}, "empty_list": lambda: [],
            "mixed": lambda: [torch.zeros(2, 8, 8, 8), 3]}
    value = made[junk]() if isinstance(junk, str) and junk in made else junk
    torch.manual_seed(0)
    student = TinyDetector()
    # The backbone itself returns the value (a forward hook returning None would keep the real output).
    student.backbone.forward = lambda x: value
    d = BridgeDistiller(student, TinyDetector(), split_points=TINY_SPLIT, hr_scale=2.0).train()
    got = "NoneType" if value is None else type(value).__name__
    with pytest.raises(SplitPointError, match=r"student's backbone split point 'backbone' to return .*"
                                              rf"(returned {got}|but got)"):
        d(torch.rand(2, 3, 32, 32), [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]])}] * 2)


def _bump(h, w, cy, cx):
    y, x = torch.arange(h, dtype=torch.float64)[:, None] + 0.5, torch.arange(w, dtype=torch.float64)[None, :] + 0.5
    return torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 2.0)


@given(stride=st.sampled_from([4, 8, 16, 32]), scale=st.floats(1.0, 4.0), data=st.data())
@settings(max_examples=15, deadline=None)
def test_a_marked_spot_lands_within_half_a_stride_of_its_hr_position(stride, scale, data):
    # Two images of different sizes on one padded canvas, as torchvision batches them. The marked spot
    # is an LR cell (a bump centred on it): bilinear resampling peaks where that cell's centre lands, so
    # the HR cell holding the maximum must be within half a stride of it. Cells on the canvas border are
    # not marked: border padding repeats them, a plateau with no single maximum.
    sizes = [(data.draw(st.integers(3 * stride, 160)), data.draw(st.integers(3 * stride, 160))) for _ in range(2)]
    hr_sizes = [(round(h * scale), round(w * scale)) for h, w in sizes]

    def canvas(ss):
        return tuple(math.ceil(max(s[k] for s in ss) / 32) * 32 for k in (0, 1))

    lr_canvas, hr_canvas = canvas(sizes), canvas(hr_sizes)
    fh, fw = lr_canvas[0] // stride, lr_canvas[1] // stride
    cells = [(data.draw(st.integers(1, min(int(h / stride - 0.5), fh - 2))),
              data.draw(st.integers(1, min(int(w / stride - 0.5), fw - 2)))) for h, w in sizes]
    feat = torch.stack([_bump(fh, fw, cy + 0.5, cx + 0.5)[None] for cy, cx in cells])
    oh, ow = hr_canvas[0] // stride, hr_canvas[1] // stride
    out = resample_to_hr(feat, lr_canvas, hr_canvas, (oh, ow), sizes, hr_sizes)
    for i, (cy, cx) in enumerate(cells):
        ry, rx = hr_sizes[i][0] / sizes[i][0], hr_sizes[i][1] / sizes[i][1]
        iy, ix = divmod(int(out[i, 0].argmax()), ow)
        assert abs((iy + 0.5) * stride - (cy + 0.5) * stride * ry) <= stride / 2 + 1e-6
        assert abs((ix + 0.5) * stride - (cx + 0.5) * stride * rx) <= stride / 2 + 1e-6
