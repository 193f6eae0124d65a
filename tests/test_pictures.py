"""Pictures of predictions: the VOC palette, the grid written after each step, the demo's grid."""

import sys

import numpy as np
import pytest
import torch

from incseg_fast.train import run
from incseg_fast.train.pictures import (
    PANEL_INCHES,
    PICTURE_IMAGES,
    PICTURES_SKIPPED,
    colorize,
    voc_palette,
    write_predictions_picture,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_voc_palette_is_the_standard_colour_map():
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128), 15: (192, 128, 128)}
    for label, colour in expected.items():
        assert tuple(palette[label]) == colour, label
    assert tuple(palette[20]) == (0, 64, 128)  # tv/monitor
    assert len({tuple(c) for c in palette}) == 256  # every id its own colour


def test_colorize_paints_labels_and_ignored_pixels():
    labels = np.array([[0, 1], [255, 20]])
    picture = colorize(labels)
    assert picture.shape == (2, 2, 3) and picture.dtype == np.uint8
    assert [tuple(picture[0, 0]), tuple(picture[0, 1])] == [(0, 0, 0), (128, 0, 0)]
    assert tuple(picture[1, 0]) == (255, 255, 255)  # ignored is white, not the palette's 255
    assert tuple(picture[1, 1]) == (0, 64, 128)


def test_without_matplotlib_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    images, labels = torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long)
    message = write_predictions_picture(tmp_path / "p.png", images, labels, {"ft": labels}, None)
    assert message == PICTURES_SKIPPED
    assert not (tmp_path / "p.png").exists()


def _tiny(out, method):
    from incseg_fast.train import TrainConfig

    return TrainConfig(
        dataset="synthetic",
        task="15-5",
        method=method,
        out=str(out),
        image_size=32,
        train_images=48,
        val_images=16,
        epochs=1,
        batch_size=8,
        device="cpu",
        progress=False,
    )


def test_each_step_writes_its_predictions_grid(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    run(_tiny(tmp_path, "mib"))
    for step in (0, 1):
        pixels = image.imread(tmp_path / "mib" / f"predictions_step{step}.png")
        # rows = images; columns = image, ground truth, the prediction; 80 dpi; a legend strip below
        rows, columns = PICTURE_IMAGES, 3
        assert pixels.shape[:2] == (round(80 * (PANEL_INCHES * rows + 0.9)), round(80 * PANEL_INCHES * columns))
    # the ground truth is drawn in the palette: every class of the first image appears in its colour
    from incseg_fast.train import trainer
    from incseg_fast.train.pictures import picture_samples

    cfg = _tiny(tmp_path, "mib").resolved()
    _, labels = picture_samples(trainer._val_subset(cfg, trainer.StepPlan(cfg, 1), trainer._dataset(cfg, "val")))
    drawn = {tuple(c) for c in np.unique((pixels[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)}
    wanted = {tuple(c) for c in colorize(labels[0].numpy()).reshape(-1, 3)}
    assert len(wanted) > 1 and wanted <= drawn
