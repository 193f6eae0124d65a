"""ADE20K (SceneParsing / ADEChallengeData2016): 150 classes, ids 1-150, 0 = "void".

Expected layout under `root`:

    ADEChallengeData2016/images/{training,validation}/<name>.jpg
    ADEChallengeData2016/annotations/{training,validation}/<name>.png   (greyscale ids 0-150)

As in MiB, void (0) is the background class 0 in training, and ignored (255) in validation:
ADE20K has no real background, so the void pixels are not scored.
"""

import os

import torch

from ._files import FileSegmentation, require_path

__all__ = ["ADE20KSegmentation"]


class ADE20KSegmentation(FileSegmentation):
    num_classes = 151

    def __init__(self, root, split="train", transform=None, normalize=True):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        folder = "training" if split == "train" else "validation"
        base = require_path(os.path.join(root, "ADEChallengeData2016"), "ADE20K directory")
        image_dir = require_path(os.path.join(base, "images", folder), "ADE20K image directory")
        label_dir = require_path(os.path.join(base, "annotations", folder), "ADE20K annotation directory")
        names = sorted(os.path.splitext(f)[0] for f in os.listdir(image_dir) if f.lower().endswith(".jpg"))
        if not names:
            raise FileNotFoundError(f"no .jpg images in {image_dir}")
        pairs = [
            (
                os.path.join(image_dir, f"{n}.jpg"),
                require_path(os.path.join(label_dir, f"{n}.png"), "ADE20K annotation"),
            )
            for n in names
        ]
        super().__init__(pairs, f"ade-{split}", transform, normalize)
        if split == "val":
            self.label_lut = torch.arange(256)
            self.label_lut[0] = self.ignore_index
