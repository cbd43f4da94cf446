"""A tiny YOLO-format dataset and tiny YOLO model yamls, written into a folder, for tests that run Ultralytics' own
``model.train()`` offline."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import yaml as pyyaml
from PIL import Image

NAMES = {0: "red", 1: "green"}


def write_dataset(root: Path, n_train: int = 8, n_val: int = 4, size: int = 128, seed: int = 0) -> Path:
    """Images of coloured rectangles (class 0 red, 1 green) on noise, with YOLO labels; returns the data yaml."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = (rng.random((size, size, 3)) * 60 + 40).astype(np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                w, h = (int(v) for v in rng.integers(size // 6, size // 3, 2))
                x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
                c = int(rng.integers(0, 2))
                img[y:y + h, x:x + w] = (220, 60, 60) if c == 0 else (60, 200, 60)
                lines.append(f"{c} {(x + w / 2) / size:.6f} {(y + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}")
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(pyyaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                      "names": NAMES}))
    return data


def write_model_yaml(folder: Path, family: str = "yolov8", width: float = 0.0625) -> Path:
    """The family's yaml (``yolov8``, ``yolo11``, ``yolo26``) at ``width`` of the n model's channels, saved as
    ``<family>t.yaml`` (scale ``t``), so that ``YOLO(path)`` builds a model a few times smaller than n."""
    from ultralytics.nn.tasks import yaml_model_load

    cfg = copy.deepcopy(yaml_model_load(f"{family}n.yaml"))
    cfg["scales"] = {"t": [0.33, width, 1024]}
    for k in ("scale", "yaml_file", "ch"):
        cfg.pop(k, None)
    path = Path(folder) / f"{family}t.yaml"
    path.write_text(pyyaml.safe_dump(cfg, sort_keys=False))
    return path
