"""Pictures of predictions: a grid of a few fixed validation images, their ground truth and the
predictions of one or more models, in the VOC palette, with a legend of the classes shown.

``predictions_stepK.png`` is written in a method's folder after its step K (one prediction column),
and by the demo in its output folder (one column per method). Needs matplotlib (the ``[plot]``
extra); without it nothing is written and the functions return :data:`PICTURES_SKIPPED`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .._atomic import refresh_file
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

IGNORE_COLOUR = (255, 255, 255)  # label 255, "ignored", is white
PICTURES_SKIPPED = "matplotlib is not installed: skipped the predictions picture (pip install matplotlib)"
PICTURE_IMAGES = 4  # validation images per picture: the first ones, the same after every step
PANEL_INCHES = 1.6  # side of one image in the grid
DPI = 80
TEXT_PIXELS = 12  # every title and legend entry: legible at the picture's own size
TEXT_POINTS = TEXT_PIXELS * 72 / DPI
TITLE_INCHES = 2.2 * TEXT_PIXELS / DPI  # the strip above the grid for the picture's title


def voc_palette(num_colours: int = 256) -> np.ndarray:
    """The standard VOC colour map, (num_colours, 3) uint8: the bits of the class id are spread over
    the colour channels, highest first (class 1 = (128, 0, 0), 2 = (0, 128, 0), 3 = (128, 128, 0), ...)."""
    palette = np.zeros((num_colours, 3), dtype=np.uint8)
    for label in range(num_colours):
        code, rgb = label, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((code >> channel) & 1) << (7 - bit)
            code >>= 3
        palette[label] = rgb
    return palette


def colorize(labels) -> np.ndarray:
    """A label map (H, W) of class ids and 255 (ignored) as an (H, W, 3) uint8 picture."""
    labels = np.asarray(labels)
    palette = voc_palette()
    palette[255] = IGNORE_COLOUR
    return palette[labels.astype(np.int64)]


def _displayable(image: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) image back in [0, 1], (H, W, 3)."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (image.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def picture_samples(dataset, count: int = PICTURE_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of the dataset's first ``count`` images: the same images after every step."""
    pairs = [dataset[i] for i in range(min(count, len(dataset)))]
    return torch.stack([p[0] for p in pairs]), torch.stack([torch.as_tensor(p[1]) for p in pairs])


@torch.no_grad()
def predict(model, images: torch.Tensor, device) -> torch.Tensor:
    model.eval()
    return model.predict(model(images.to(device))["logits"]).cpu()


def write_predictions_picture(path, images, labels, predictions: dict, class_names, title: str = "") -> str | None:
    """Rows = images; columns = image, ground truth, then one per entry of ``predictions``
    ({column title: (N, H, W) label maps}); ``title`` above the grid. Returns None, or why nothing
    was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return PICTURES_SKIPPED
    fig = predictions_figure(images, labels, predictions, class_names, title)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=DPI)
    plt.close(fig)
    refresh_file(Path(path), image.getvalue())
    return None


def legend_inches(labels: list[str], columns: int) -> tuple[int, float]:
    """(legend columns, height of the legend strip below the grid) for ``labels`` at TEXT_PIXELS in
    a picture of ``columns`` panels: as many legend columns as the longest label lets fit."""
    entry_pixels = (0.65 * max(map(len, labels)) + 4) * TEXT_PIXELS  # text, patch and gaps
    per_row = max(1, min(len(labels), int(PANEL_INCHES * columns * DPI // entry_pixels)))
    rows = -(-len(labels) // per_row)
    return per_row, (rows * 1.6 * TEXT_PIXELS + 10) / DPI


def predictions_figure(images, labels, predictions: dict, class_names, title: str = ""):
    """The matplotlib figure of :func:`write_predictions_picture` (needs matplotlib)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    columns = [("image", None), ("ground truth", labels), *predictions.items()]
    rows = len(images)
    shown = sorted({int(c) for maps in [labels, *predictions.values()] for c in torch.unique(maps)} - {255})
    palette = voc_palette()
    handles = [Patch(color=palette[c] / 255, label=_class_name(class_names, c)) for c in shown]
    handles.append(Patch(facecolor="white", edgecolor="black", label="ignored"))
    legend_columns, legend_height = legend_inches([h.get_label() for h in handles], len(columns))
    height = PANEL_INCHES * rows + legend_height + TITLE_INCHES
    fig, axes = plt.subplots(rows, len(columns), figsize=(PANEL_INCHES * len(columns), height), dpi=DPI, squeeze=False)
    for r in range(rows):
        for c, (heading, maps) in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(_displayable(images[r]) if maps is None else colorize(maps[r].numpy()), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(heading, fontsize=TEXT_POINTS)
    fig.suptitle(title, fontsize=TEXT_POINTS)
    fig.legend(handles=handles, loc="lower center", ncol=legend_columns, fontsize=TEXT_POINTS, frameon=False)
    fig.tight_layout(rect=(0, legend_height / height, 1, 1 - TITLE_INCHES / height))
    return fig


def _class_name(class_names, c: int) -> str:
    return class_names[c] if class_names is not None and c < len(class_names) else f"class {c}"
