"""Pascal VOC 2012 with the SBD-augmented training set (10,582 images), as MiB uses it.

Expected layout under `root`:

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png          (palette PNGs: ids 0-20, 255 ignore)
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt
    SegmentationClassAug/<id>.png                         (SBD + VOC labels, greyscale or palette)
    train_aug.txt                                         (one <id> per line; MiB's
                                                           "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"
                                                           lines are read too)
    VOCdevkit/VOC2012/saliency_map/<id>.png               (saliency=True only: SSUL's greyscale saliency
                                                           maps, > 0 = salient)
"""

import os

from ._files import DataFileError, FileSegmentation, require_path

__all__ = ["VOCSegmentation", "VOC_CLASS_NAMES"]

VOC_CLASS_NAMES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]


def _read_ids(path):
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise DataFileError(f"image list {path} is not a text file") from None
    # the first token is either "<id>" or a path ending in "<id>.jpg"
    ids = [os.path.splitext(os.path.basename(line.split()[0]))[0] for line in lines if line.strip()]
    if not ids:  # refused before a step trains, not after it (its evaluation would have no image)
        raise DataFileError(f"image list {path} is empty (it names no image)")
    return ids


class VOCSegmentation(FileSegmentation):
    num_classes = 21
    class_names = VOC_CLASS_NAMES

    def __init__(self, root, split="train", transform=None, augmented=True, normalize=True, saliency=False):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        voc = require_path(os.path.join(root, "VOCdevkit", "VOC2012"), "VOC 2012 directory")
        image_dir = require_path(os.path.join(voc, "JPEGImages"), "VOC image directory")
        if split == "train" and augmented:
            list_file = os.path.join(root, "train_aug.txt")
            label_dir = os.path.join(root, "SegmentationClassAug")
        else:
            list_file = os.path.join(voc, "ImageSets", "Segmentation", f"{split}.txt")
            label_dir = os.path.join(voc, "SegmentationClass")
        ids = _read_ids(require_path(list_file, f"VOC {split} image list"))
        require_path(label_dir, "VOC label directory")
        pairs = [(os.path.join(image_dir, f"{i}.jpg"), os.path.join(label_dir, f"{i}.png")) for i in ids]
        for pair in pairs[:1] + pairs[-1:]:  # a cheap check that the list matches the files
            require_path(pair[0], "VOC image")
            require_path(pair[1], "VOC label")
        saliency_paths = _saliency_paths(voc, ids) if saliency else None
        name = f"voc-{split}{'-aug' if split == 'train' and augmented else ''}"
        super().__init__(pairs, name, transform, normalize, saliency_paths)


def _saliency_paths(voc, ids):
    """SSUL's saliency maps: saliency_map/<id>.png next to JPEGImages (the first and last checked here,
    every one by check_files and by the reader)."""
    folder = require_path(os.path.join(voc, "saliency_map"), "VOC saliency map directory (SSUL's saliency_map)")
    paths = [os.path.join(folder, f"{i}.png") for i in ids]
    for path in paths[:1] + paths[-1:]:
        require_path(path, "VOC saliency map")
    return paths
