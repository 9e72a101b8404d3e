"""Readers for the standard unsupervised-segmentation benchmarks, in their on-disk layouts.

Each yields `Sample(name, image, label)` with the standard class mapping applied; ignored
pixels hold the dataset's `ignore_index` (255; 65535 for PASCAL-Context-459, whose 459
classes do not fit a byte). COCO-Stuff and Cityscapes-27 follow STEGO/PiCIE: shorter side
resized to 320 (bilinear image, nearest label) and centre-cropped to 320. ADE20K,
PASCAL-Context and Cityscapes-19 (the paper's Table 2, modified protocol) are evaluated at
their original size (choice). `shapes` reads generated scenes (scenes.py's layout): 4
classes, background, disc, rectangle, triangle, at their own size. COCO-Stuff uses the full val2017 set (5000 images, the
paper's Table 1) unless subset="curated" (STEGO's 2175-image list, which scores higher).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .images import load_image

IGNORE = 255
IGNORE_16 = 65535  # PASCAL-Context-459's ignore value (the detectron2 layout's)

# COCO-Stuff fine ids 0..181 (stuffthingmaps) -> the 27 coarse classes of IIC/PiCIE/STEGO
# (12 "things" supercategories, then 15 "stuff").
COCO_FINE_TO_27 = [
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6,
    10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
    3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25,
    16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22, 21, 21,
    24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14,
    21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19,
    19, 24,
]
# fine ids unused by COCO-Stuff (removed COCO categories); the other 171 map to 0..170
COCO_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_CURATED_VAL = "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt"
# Cityscapes labelIds -> the standard 19 trainIds (cityscapesScripts' labels.py); others ignored
CITYSCAPES_19 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _lut(mapping: dict[int, int]) -> np.ndarray:
    lut = np.full(256, IGNORE, np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


LUTS = {
    "cocostuff27": _lut(dict(enumerate(COCO_FINE_TO_27))),
    "cocostuff171": _lut({f: i for i, f in enumerate(f for f in range(182) if f not in COCO_UNUSED)}),
    "ade20k": _lut({v: v - 1 for v in range(1, 151)}),              # 0 = "other" -> ignored
    "cityscapes": _lut({v: v - 7 for v in range(7, 34)}),           # labelIds 7..33; 0..6 void
    "cityscapes19": _lut(CITYSCAPES_19),
    "pascal_context59": _lut({v: v - 1 for v in range(1, 60)}),     # 0 = background -> ignored
    "pascal_context459": None,  # stored 0-based already (0..458, 65535 ignored)
    "shapes": _lut({v: v for v in range(4)}),                      # generated scenes (scenes.py)
}
NUM_CLASSES = {"cocostuff27": 27, "cocostuff171": 171, "ade20k": 150, "cityscapes": 27, "cityscapes19": 19,
               "pascal_context59": 59, "pascal_context459": 459, "shapes": 4}
CROP_320 = {"cocostuff27", "cocostuff171", "cityscapes"}
SUBSETS = ("full", "curated")


class DatasetError(ValueError):
    """A dataset root is missing or not in the expected layout."""


# class names in class-id order, for naming segments (eval --open-vocab): the lists of
# mmsegmentation (ADE20K-150, COCO-Stuff-164k's 171, PASCAL-Context-59) and of detectron2's
# PASCAL-Context-459 layout, shipped as class_names/NAME.txt, one name per line
NAMED_DATASETS = ("ade20k", "cocostuff171", "pascal_context59", "pascal_context459", "shapes")


def read_names(path: str | Path) -> list[str]:
    """A names file: one name per line, surrounding blanks and empty lines dropped."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def class_names(name: str, names_file: str | Path | None = None) -> list[str]:
    """The data set's class names in id order, or the lines of `names_file` (any data set);
    the count must equal the data set's number of classes."""
    if names_file is not None:
        path = Path(names_file)
        if not path.is_file():
            raise DatasetError(f"class-names file {path} not found")
        names = read_names(path)
    elif name == "shapes":
        from .scenes import CLASSES

        names = list(CLASSES)
    elif name in NAMED_DATASETS:
        names = read_names(Path(__file__).parent / "class_names" / f"{name}.txt")
    else:
        raise DatasetError(f"no class names ship for {name} (they do for {', '.join(NAMED_DATASETS)}): "
                           "give them with --class-names FILE, one per line in class-id order")
    if name in NUM_CLASSES and len(names) != NUM_CLASSES[name]:
        raise DatasetError(f"{name} has {NUM_CLASSES[name]} classes, the names list {len(names)}")
    if len(set(names)) < len(names):
        raise DatasetError("class names must be distinct")
    return names


@dataclass
class Sample:
    name: str
    image: Image.Image
    label: np.ndarray  # (H, W) class ids: uint8 with 255 ignored, or uint16 with 65535 ignored


def resize_crop(image: Image.Image, label: Image.Image, size: int = 320):
    """Shorter side -> size (bilinear / nearest), then centre crop size x size."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image, label = image.resize((nw, nh), Image.BILINEAR), label.resize((nw, nh), Image.NEAREST)
    left, top = (nw - size) // 2, (nh - size) // 2
    box = (left, top, left + size, top + size)
    return image.crop(box), label.crop(box)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"expected {what} at {path}")
    return path


def _pairs(name: str, root: Path, subset: str = "full") -> list[tuple[str, Path, Path]]:
    """(id, image path, label path) for the validation split, in a fixed order."""
    if name in ("cocostuff27", "cocostuff171"):
        if subset == "curated":
            ids = _need(root / COCO_CURATED_VAL, "the curated validation list (STEGO layout)").read_text().split()
        else:
            ids = sorted(p.stem for p in _need(root / "images/val2017", "COCO images/val2017").glob("*.jpg"))
        return [(i, root / "images/val2017" / f"{i}.jpg", root / "annotations/val2017" / f"{i}.png") for i in ids]
    if name == "ade20k":
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        imgs = sorted(_need(root / "images/validation", "ADEChallengeData2016 images").glob("*.jpg"))
        return [(p.stem, p, root / "annotations/validation" / f"{p.stem}.png") for p in imgs]
    if name in ("cityscapes", "cityscapes19"):
        imgs = sorted(_need(root / "leftImg8bit/val", "Cityscapes leftImg8bit/val").glob("*/*_leftImg8bit.png"))
        return [(p.name.removesuffix("_leftImg8bit.png"), p,
                 root / "gtFine/val" / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
                for p in imgs]
    if name == "pascal_context59":
        voc = root / "VOCdevkit/VOC2010" if (root / "VOCdevkit").is_dir() else root
        ids = _need(voc / "ImageSets/SegmentationContext/val.txt", "the PASCAL-Context val list (mmseg layout)").read_text().split()
        return [(i, voc / "JPEGImages" / f"{i}.jpg", voc / "SegmentationClassContext" / f"{i}.png") for i in ids]
    if name == "pascal_context459":
        voc = root / "VOCdevkit/VOC2010" if (root / "VOCdevkit").is_dir() else root
        labs = sorted(_need(voc / "annotations_detectron2/pc459_val",
                            "PASCAL-Context-459 annotations_detectron2/pc459_val (detectron2 layout)").glob("*.tif"))
        return [(p.stem, voc / "JPEGImages" / f"{p.stem}.jpg", p) for p in labs]
    if name == "shapes":  # scenes.write_dataset's layout; scenes.jsonl lists the finished scenes
        from .scenes import read_records

        _need(root / "scenes.jsonl", "scenes.jsonl (write a set with `emerdiff-fast scenes`)")
        return [(r["id"], root / "images" / f"{r['id']}.png", root / "classes" / f"{r['id']}.png")
                for r in read_records(root)]
    raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(NUM_CLASSES)}")


class SegmentationDataset:
    """Iterable (and indexable) validation set of one benchmark."""

    def __init__(self, name: str, root: str | Path, limit: int | None = None, subset: str = "full"):
        self.name, self.root, self.subset = name, Path(root), subset
        if subset not in SUBSETS:
            raise DatasetError(f"subset must be one of {SUBSETS}, got {subset!r}")
        if subset != "full" and not name.startswith("cocostuff"):
            raise DatasetError(f"subset {subset!r} exists for COCO-Stuff only, not {name}")
        if limit is not None and limit < 1:
            raise DatasetError(f"limit must be at least 1, got {limit}")
        if name not in NUM_CLASSES:
            raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(NUM_CLASSES)}")
        _need(self.root, f"the {name} dataset root")
        self.items = _pairs(name, self.root, subset)[:limit]
        if not self.items:
            raise DatasetError(f"no validation images found under {self.root} for {name}")
        for _, img, lab in self.items[:1]:
            _need(img, "an image listed in the split")
            _need(lab, "its label map")
        self.num_classes = NUM_CLASSES[name]
        self.ignore_index = IGNORE_16 if name == "pascal_context459" else IGNORE

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        sid, img_path, lab_path = self.items[i]
        # stored orientation: the label maps are aligned with the stored pixels, not with EXIF
        image = load_image(_need(img_path, "an image listed in the split"), orient=False)
        try:
            label = Image.open(_need(lab_path, "a label map"))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read label map {lab_path} ({exc})") from None
        if self.ignore_index == IGNORE_16:
            if not (label.mode.startswith("I;16") or label.mode == "I"):
                raise DatasetError(f"label map {lab_path} must be a 16-bit single-channel TIFF, got mode {label.mode}")
        elif label.mode not in ("L", "P"):
            raise DatasetError(f"label map {lab_path} must be a single-channel 8-bit PNG, got mode {label.mode}")
        if label.size != image.size:
            raise DatasetError(f"label map {lab_path} is {label.size}, its image {image.size}")
        if self.name in CROP_320:
            image, label = resize_crop(image, label)
        lut = LUTS[self.name]
        if lut is None:
            arr = np.asarray(label).astype(np.uint16)
            bad = (arr >= self.num_classes) & (arr != self.ignore_index)
            if bad.any():
                raise DatasetError(f"label map {lab_path} holds id {int(arr[bad].max())}, outside 0..{self.num_classes - 1} "
                                   f"and not the ignore value {self.ignore_index}")
            return Sample(sid, image, arr)
        return Sample(sid, image, lut[np.asarray(label)])

    def __iter__(self):
        return (self[i] for i in range(len(self)))
