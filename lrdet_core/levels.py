"""Pairing student and teacher pyramid levels: by stride, by name or order where strides collide, or as told.

Most pyramids have one level per stride, and pairing by stride lets different detectors distil each other.
Some have several levels at one stride: torchvision's MobileNetV3 FPN returns levels ``'0'`` and ``'1'``, both
at stride 32. Those are paired by name when both sides have the same names at that stride, else by order; a
``level_map`` says which pairs to distil when no rule can guess.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from torch import Tensor

from .errors import InputError, LevelMatchError
from .warn import warn_user

#: ``{student_level: teacher_level}`` for every teacher, or ``{teacher_name: {student_level: teacher_level}}``.
LevelMap = Union[Mapping[object, object], Mapping[str, Mapping[object, object]]]


class Level(NamedTuple):
    """One pyramid level of one side: its name, its stride on the canvas and its features."""

    key: str
    stride: int
    tensor: Tensor


class LevelSize(NamedTuple):
    """A teacher backbone level as the bridge needs it: name, stride and HR size (not the map: memory)."""

    key: str
    stride: int
    size: Tuple[int, int]


class LevelPair(NamedTuple):
    """A student level and the teacher level it is distilled towards.

    ``name`` identifies the pair among a teacher's pairs (projector names): ``"s8"``, and ``"s32_1"``
    for the second pair at stride 32, so that pyramids with one level per stride keep their old names.
    """

    stride: int
    student_key: str
    teacher_key: str
    student: Tensor
    teacher: Tensor
    name: str


def normalize_level_map(level_map: Optional[LevelMap], teachers: Sequence[str],
                        who: Mapping[str, str]) -> Dict[str, Dict[str, str]]:
    """``level_map`` as ``{teacher_name: {student_key: teacher_key}}`` with string keys, validated.

    Args:
        level_map: ``None``; ``{student_level: teacher_level}`` (every teacher); or ``{teacher_name:
            {student_level: teacher_level}}`` (teachers not named keep the automatic pairing). Level names
            are the keys of the neck's output dict, or ``0, 1, ...`` for a list (ints or strings).
        teachers: the teachers' names, in order.
        who: how each teacher is named in messages.

    Raises:
        InputError: for a map that is neither form, an unknown teacher name, or a teacher level used twice.

    Example:
        >>> normalize_level_map({0: "p3", "1": "p4"}, ["teacher"], {"teacher": "teacher"})
        {'teacher': {'0': 'p3', '1': 'p4'}}
    """
    if level_map is None:
        return {}
    if not isinstance(level_map, Mapping) or not level_map:
        raise InputError(f"expected level_map to be a non-empty dict {{student_level: teacher_level}} or "
                         f"{{teacher_name: {{student_level: teacher_level}}}}, but got {level_map!r}")
    nested = [isinstance(v, Mapping) for v in level_map.values()]
    if any(nested) and not all(nested):
        raise InputError(f"expected level_map to map every key to a level name ({{student_level: teacher_level}}) "
                         f"or every key to a dict ({{teacher_name: {{...}}}}), but it mixes both: {level_map!r}")
    per_teacher = dict(level_map) if all(nested) else {n: level_map for n in teachers}
    unknown = [n for n in per_teacher if n not in teachers]
    if unknown:
        raise InputError(f"level_map names teacher(s) {unknown}, but the teachers are {list(teachers)}")
    out: Dict[str, Dict[str, str]] = {}
    for n, m in per_teacher.items():
        if not m:
            raise InputError(f"expected level_map[{n!r}] to name at least one pair of levels, but it is empty")
        pairs = {str(k): str(v) for k, v in m.items()}
        used: Dict[str, str] = {}
        for s, t in pairs.items():
            if t in used:
                raise InputError(f"level_map pairs the {who[n]}'s level {t!r} with the student's levels {used[t]!r} "
                                 f"and {s!r}; expected each teacher level at most once")
            used[t] = s
        out[n] = pairs
    return out


def pair_levels(student: Sequence[Level], teacher: Sequence[Level], who: str,
                level_map: Optional[Mapping[str, str]] = None) -> List[LevelPair]:
    """Pair the student's levels with the teacher's.

    With ``level_map``: exactly its pairs, in its order. Without: every stride present on both sides; at a
    stride with several levels on either side, levels with the same names pair by name, else equal counts
    pair in order, else the pairing is ambiguous and a ``level_map`` is asked for.

    Raises:
        LevelMatchError: for a ``level_map`` naming unknown levels, an ambiguous stride, no common stride,
            or paired levels whose batch or spatial sizes differ.

    Example:
        >>> import torch
        >>> z = torch.zeros(1, 1, 2, 2)
        >>> s = [Level("0", 32, z), Level("1", 32, z)]
        >>> t = [Level("a", 32, z), Level("b", 32, z), Level("pool", 64, z[..., :1, :1])]
        >>> [(p.student_key, p.teacher_key, p.name) for p in pair_levels(s, t, "teacher")]
        [('0', 'a', 's32'), ('1', 'b', 's32_1')]
    """
    _check_read_strides(student, "student")
    _check_read_strides(teacher, who)
    if level_map is not None:
        s_by, t_by = {lv.key: lv for lv in student}, {lv.key: lv for lv in teacher}
        bad_s = [k for k in level_map if k not in s_by]
        bad_t = [v for v in level_map.values() if v not in t_by]
        if bad_s or bad_t:
            parts = ([f"student level(s) {bad_s}, but the student's neck has {list(s_by)}"] if bad_s else []) + (
                [f"{who} level(s) {bad_t}, but the {who}'s neck has {list(t_by)}"] if bad_t else [])
            raise LevelMatchError(f"level_map names {'; and '.join(parts)}")
        chosen = [(s_by[k], t_by[v]) for k, v in level_map.items()]
    else:
        chosen = _pair_by_stride(student, teacher, who)
    pairs: List[LevelPair] = []
    seen: Dict[int, int] = {}
    for s, t in chosen:
        if s.tensor.shape[0] != t.tensor.shape[0] or s.tensor.shape[-2:] != t.tensor.shape[-2:]:
            raise LevelMatchError(f"expected the student's level {s.key!r} and the {who}'s level {t.key!r} "
                                  f"(stride {t.stride}) to have the same batch and spatial size, but got "
                                  f"{tuple(s.tensor.shape)} and {tuple(t.tensor.shape)}")
        i = seen[t.stride] = seen.get(t.stride, -1) + 1
        pairs.append(LevelPair(t.stride, s.key, t.key, s.tensor, t.tensor,
                               f"s{t.stride}" if i == 0 else f"s{t.stride}_{i}"))
    return pairs


def unpaired_strides(student: Sequence[Level], teacher: Sequence[Level]) -> List[int]:
    """Strides present on one side only (their levels are not distilled)."""
    return sorted({lv.stride for lv in student} ^ {lv.stride for lv in teacher})


def warn_unpaired(student: Sequence[Level], teacher: Sequence[Level], who: str) -> bool:
    """Warn when levels of some stride have no partner on the other side (they are not distilled); whether it
    warned."""
    skipped = unpaired_strides(student, teacher)
    if skipped:
        warn_user(f"LRDet: levels with stride {skipped} have no partner between the student and the {who} and "
                  f"are not distilled (student strides {sorted({lv.stride for lv in student})}, teacher strides "
                  f"{sorted({lv.stride for lv in teacher})})")
    return bool(skipped)


def _pair_by_stride(student: Sequence[Level], teacher: Sequence[Level], who: str) -> List[tuple]:
    s_at, t_at = _by_stride(student), _by_stride(teacher)
    common = sorted(set(s_at) & set(t_at))
    if not common:
        raise LevelMatchError(f"cannot match any pyramid level: the student's neck has strides {sorted(s_at)} "
                              f"and the {who}'s has {sorted(t_at)}")
    chosen = []
    for stride in common:
        ss, ts = s_at[stride], t_at[stride]
        s_keys, t_keys = [lv.key for lv in ss], [lv.key for lv in ts]
        if len(ss) == 1 and len(ts) == 1:
            chosen.append((ss[0], ts[0]))
        elif sorted(s_keys) == sorted(t_keys):
            t_by = {lv.key: lv for lv in ts}
            chosen.extend((lv, t_by[lv.key]) for lv in ss)
        elif len(ss) == len(ts):
            chosen.extend(zip(ss, ts))
        else:
            raise LevelMatchError(f"cannot tell which levels to pair at stride {stride}: the student has {s_keys} "
                                  f"and the {who} has {t_keys}. Pass level_map={{student_level: teacher_level}} "
                                  f"with the pairs to distil, e.g. level_map={{{s_keys[0]!r}: {t_keys[-1]!r}}}")
    return chosen


#: Levels that truly share a stride differ in size by the rounding of their convolutions only (17 and 16
#: cells); sizes further apart than this ratio mean the strides were misread.
_SAME_STRIDE_RATIO = 1.25


def _check_read_strides(levels: Sequence[Level], side: str) -> None:
    """Levels that share a stride must be about the same size. Levels of one stride whose sizes differ by
    more than the rounding of a convolution mean that the strides were misread: on a 20 px canvas, 3 cells
    and 2 cells both round to stride 8. Pairing them, and telling a loss (FGD's masks) the wrong stride,
    would be silently wrong."""
    for stride, lvs in _by_stride(levels).items():
        far = [(a, b) for a in lvs for b in lvs if any(
            x > _SAME_STRIDE_RATIO * max(y, 1) for x, y in zip(a.tensor.shape[-2:], b.tensor.shape[-2:]))]
        if far:
            a, b = sorted(far[0], key=lvs.index)
            raise LevelMatchError(
                f"expected one {side} level per stride, but levels {a.key!r} and {b.key!r} both have stride "
                f"{stride} with sizes {tuple(a.tensor.shape[-2:])} and {tuple(b.tensor.shape[-2:])}: on a canvas "
                f"this small the strides cannot be read off the feature sizes; use larger images")


def _by_stride(levels: Sequence[Level]) -> Dict[int, List[Level]]:
    out: Dict[int, List[Level]] = {}
    for lv in levels:
        out.setdefault(lv.stride, []).append(lv)
    return out
