"""Pictures of predictions: the VOC palette, the grid written after each step, the demo's grid."""

import sys

import numpy as np
import pytest
import torch

from incseg_fast.train import run
from incseg_fast.train.pictures import (
    DPI,
    PANEL_INCHES,
    PICTURE_IMAGES,
    PICTURES_SKIPPED,
    TEXT_PIXELS,
    colorize,
    predictions_figure,
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


def test_each_step_writes_its_predictions_grid(tmp_path, monkeypatch):
    image = pytest.importorskip("matplotlib.image")
    from incseg_fast.train import pictures

    titles, draw = [], pictures.write_predictions_picture
    monkeypatch.setattr(pictures, "write_predictions_picture", lambda *a: titles.append(a[-1]) or draw(*a))
    run(_tiny(tmp_path, "mib"))
    assert titles == ["synthetic 15-5 disjoint, step 0", "synthetic 15-5 disjoint, step 1"]
    for step in (0, 1):
        pixels = image.imread(tmp_path / "mib" / f"predictions_step{step}.png")
        # rows = images; columns = image, ground truth, the prediction; a title above, a legend below
        rows, columns = PICTURE_IMAGES, 3
        assert pixels.shape[1] == round(DPI * PANEL_INCHES * columns)
        assert pixels.shape[0] > DPI * PANEL_INCHES * rows + 3 * TEXT_PIXELS
    # the ground truth is drawn in the palette: every class of the first image appears in its colour
    from incseg_fast.train import trainer
    from incseg_fast.train.pictures import picture_samples

    cfg = _tiny(tmp_path, "mib").resolved()
    _, labels = picture_samples(trainer._val_subset(cfg, trainer.StepPlan(cfg, 1), trainer._dataset(cfg, "val")))
    drawn = {tuple(c) for c in np.unique((pixels[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)}
    wanted = {tuple(c) for c in colorize(labels[0].numpy()).reshape(-1, 3)}
    assert len(wanted) > 1 and wanted <= drawn


def test_every_text_is_at_least_12_pixels_and_the_title_names_step_and_task():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    generator = torch.Generator().manual_seed(3)
    images = torch.randn(PICTURE_IMAGES, 3, 24, 24, generator=generator)
    labels = torch.randint(0, 21, (PICTURE_IMAGES, 24, 24), generator=generator)
    title = "synthetic 15-5 disjoint, step 1"
    names = [f"class-{c}-with-a-long-name" for c in range(21)]
    fig = predictions_figure(images, labels, {"every method": labels}, names, title)
    try:
        legend_texts = fig.legends[0].get_texts()
        assert len(legend_texts) == 22  # 21 classes and "ignored"
        texts = [*legend_texts, fig._suptitle, *(ax.title for ax in fig.axes)]
        for text in texts:
            if text.get_text():
                assert text.get_fontsize() * fig.dpi / 72 >= 12, text.get_text()
        assert fig._suptitle.get_text() == title
        # nothing overlaps: the legend lies below the grid, the title above it
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        grid_bottom = min(ax.get_window_extent(renderer).y0 for ax in fig.axes)
        grid_top = max(ax.title.get_window_extent(renderer).y1 for ax in fig.axes)
        legend = fig.legends[0].get_window_extent(renderer)
        assert legend.y1 <= grid_bottom and legend.y0 >= 0
        assert legend.x0 >= 0 and legend.x1 <= fig.bbox.width  # the longest names fit across
        assert fig._suptitle.get_window_extent(renderer).y0 >= grid_top
    finally:
        plt.close(fig)
