"""Datasets and joint transforms: the synthetic generator, the VOC/ADE20K readers (on tiny
directory trees written here), build_dataset."""

from pathlib import Path

import pytest
import torch

from incseg_fast.data import (
    ADE20KSegmentation,
    DataFileError,
    SyntheticSegmentation,
    VOCSegmentation,
    build_dataset,
)
from incseg_fast.data import transforms as T
from incseg_fast.data.synthetic import SCENE_TYPES

# ---------------------------------------------------------------- synthetic


def test_synthetic_same_seed_same_tensors():
    a = SyntheticSegmentation("train", num_images=20, image_size=48, seed=7)
    b = SyntheticSegmentation("train", num_images=50, image_size=48, seed=7)  # size of the set is irrelevant
    for i in (0, 3, 19):
        xa, ya = a[i]
        xb, yb = b[i]
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(a[-1][1], a[19][1])


def test_synthetic_different_seed_or_split_differs():
    base = SyntheticSegmentation("train", num_images=10, image_size=32, seed=0)
    other_seed = SyntheticSegmentation("train", num_images=10, image_size=32, seed=1)
    val = SyntheticSegmentation("val", num_images=10, image_size=32, seed=0)
    for other in (other_seed, val):
        assert not torch.equal(base[0][0], other[0][0])
        assert sum(torch.equal(base[i][1], other[i][1]) for i in range(10)) < 3


def test_synthetic_sample_format():
    data = SyntheticSegmentation("train", num_images=4, image_size=(40, 56), seed=0)
    image, label = data[1]
    assert image.shape == (3, 40, 56) and image.dtype == torch.float32
    assert label.shape == (40, 56) and label.dtype == torch.long
    assert 0 <= label.min() and label.max() < 21
    # normalised with the ImageNet statistics: [0, 1] maps to about [-2.1, 2.7]
    assert image.min() >= -2.2 and image.max() <= 2.7 and image.std() > 0.2
    raw, _ = SyntheticSegmentation("train", num_images=4, image_size=(40, 56), normalize=False).render(1)
    assert 0 <= raw.min() and raw.max() <= 1
    assert raw.std(dim=(1, 2)).min() > 0.03  # a textured background, not a flat colour


@pytest.mark.parametrize("size", [16, 33, 64, (40, 72)])
def test_synthetic_classes_in_matches_rendered_labels(size):
    data = SyntheticSegmentation("val", num_images=40, image_size=size, seed=3)
    for i in range(len(data)):
        assert data.classes_in(i) == frozenset(data[i][1].unique().tolist())


def test_synthetic_class_statistics():
    data = SyntheticSegmentation("train", num_images=600, image_size=32, seed=0)
    counts = torch.zeros(21)
    with_new = with_new_and_old = 0
    for i in range(len(data)):
        classes = data.classes_in(i)
        counts[list(classes)] += 1
        if any(c >= 16 for c in classes):
            with_new += 1
            with_new_and_old += any(1 <= c <= 15 for c in classes)
    assert counts[0] == len(data)
    assert counts[1:].min() >= 15  # every class is seen often enough to be learned
    # new-step classes co-occur with old ones (what makes fine-tuning forget in 15-5 overlapped)
    assert with_new_and_old > 0.4 * with_new
    assert {c for _, classes, _ in SCENE_TYPES for c in classes} == set(range(1, 21))


def test_synthetic_colour_is_a_clear_but_noisy_cue():
    data = SyntheticSegmentation("train", num_images=100, image_size=32, seed=0, normalize=False)
    pixels, labels = zip(*(data.render(i) for i in range(len(data))), strict=True)
    rgb = torch.stack(pixels).permute(0, 2, 3, 1).reshape(-1, 3)
    label = torch.stack(labels).reshape(-1)
    on_object = label > 0
    saturation = (rgb.amax(1) - rgb.amin(1)) / rgb.amax(1).clamp(min=1e-3)
    assert saturation[on_object].mean() > saturation[~on_object].mean() + 0.4  # saturated objects
    # a nearest-mean-colour pixel classifier: far above chance, far from perfect
    means = torch.stack([rgb[label == c].mean(0) for c in range(21)])
    predicted = torch.cdist(rgb, means).argmin(1)
    object_accuracy = (predicted[on_object] == label[on_object]).float().mean()
    assert 0.5 < object_accuracy < 0.95


def test_synthetic_cache_and_transform():
    flip = T.RandomHorizontalFlip(p=1.0)
    cached = SyntheticSegmentation("train", num_images=5, image_size=32, cache=True, transform=flip)
    plain = SyntheticSegmentation("train", num_images=5, image_size=32)
    for _ in range(2):
        image, label = cached[2]
        assert torch.equal(label, plain[2][1].flip(-1))
        assert torch.equal(image, plain[2][0].flip(-1))


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        SyntheticSegmentation("test")
    with pytest.raises(ValueError, match="image_size"):
        SyntheticSegmentation(image_size=8)
    with pytest.raises(ValueError, match="num_images"):
        SyntheticSegmentation(num_images=0)
    with pytest.raises(IndexError):
        SyntheticSegmentation(num_images=3)[3]


# ---------------------------------------------------------------- transforms


def _coded_pair(generator, h=23, w=31):
    """An image whose channel 0 encodes the label, so that every geometric transform can be
    checked to move image and label together. The label is made of 4x4 blocks, so that an
    interpolated image still reads the label inside each block."""
    blocks = torch.randint(0, 21, (h // 4 + 1, w // 4 + 1), generator=generator)
    label = blocks.repeat_interleave(4, 0).repeat_interleave(4, 1)[:h, :w].contiguous()
    label[:3, :4] = 255
    image = torch.rand(3, h, w, generator=generator)
    image[0] = label.float() / 255
    return image, label


def test_random_crop_pads_label_with_ignore(generator):
    image, label = _coded_pair(generator, 10, 12)
    crop = T.RandomCrop((16, 14), generator=generator)
    out_image, out_label = crop(image, label)
    assert out_image.shape == (3, 16, 14) and out_label.shape == (16, 14)
    assert torch.equal(out_label[:10, :12], label)  # padding goes bottom/right only
    assert (out_label[10:] == 255).all() and (out_label[:, 12:] == 255).all()
    mean = torch.tensor(T.IMAGENET_MEAN)
    assert torch.allclose(out_image[:, 12, 13], mean)  # the mean colour, 0 after normalisation


def test_random_crop_window(generator):
    image, label = _coded_pair(generator)
    out_image, out_label = T.RandomCrop(8, generator=generator)(image, label)
    assert out_label.shape == (8, 8)
    # the window is somewhere in the input
    found = any(
        torch.equal(label[i : i + 8, j : j + 8], out_label) and torch.equal(image[:, i : i + 8, j : j + 8], out_image)
        for i in range(23 - 7)
        for j in range(31 - 7)
    )
    assert found


@pytest.mark.parametrize("scale", [0.5, 0.73, 2.0])
def test_random_scale_keeps_image_and_label_aligned(generator, scale):
    image, label = _coded_pair(generator)
    out_image, out_label = T.RandomScale(scale, scale)(image, label)
    assert out_label.shape == (round(23 * scale), round(31 * scale))
    assert out_label.dtype == torch.long
    assert set(out_label.unique().tolist()) <= set(label.unique().tolist())  # no invented ids
    if scale == 2.0:  # upsampling by 2: every output pixel copies its source pixel
        assert torch.equal(out_label, label.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_flip_and_compose(generator):
    image, label = _coded_pair(generator)
    pipeline = T.Compose(
        [T.RandomScale(2.0, 2.0), T.RandomCrop(20, generator=generator), T.RandomHorizontalFlip(p=1.0)]
    )
    out_image, out_label = pipeline(image, label)
    assert out_label.shape == (20, 20)
    # channel 0 still encodes the label away from the (interpolated) edges of the blocks
    same = (out_image[0] * 255).round().long() == out_label
    assert same.float().mean() > 0.5
    assert not (torch.flip(out_image[0] * 255, [-1]).round().long() == out_label).float().mean() > 0.5
    flipped_image, flipped_label = T.RandomHorizontalFlip(p=1.0)(image, label)
    assert torch.equal(flipped_label[:, 0], label[:, -1]) and torch.equal(flipped_image[:, :, 0], image[:, :, -1])
    kept = T.RandomHorizontalFlip(p=0.0)(image, label)
    assert kept[1] is label


def test_resize_centercrop_normalize(generator):
    image, label = _coded_pair(generator)
    resized = T.Resize(16)(image, label)
    assert resized[1].shape == (16, round(31 * 16 / 23))
    cropped = T.CenterCrop(16)(*resized)
    assert cropped[1].shape == (16, 16)
    with pytest.raises(ValueError, match="CenterCrop"):
        T.CenterCrop(40)(image, label)
    normal_image, normal_label = T.Normalize()(image, label)
    assert normal_label is label
    expected = (image[1] - T.IMAGENET_MEAN[1]) / T.IMAGENET_STD[1]
    assert torch.allclose(normal_image[1], expected)
    with pytest.raises(ValueError, match="same size"):
        T.RandomHorizontalFlip()(image, label[:, :5])


# ---------------------------------------------------------------- VOC / ADE20K readers


def _write_pair(image_path, label_path, label, generator, palette):
    Image = pytest.importorskip("PIL.Image")  # the readers need Pillow; the rest of this file does not
    h, w = label.shape
    pixels = (torch.rand(h, w, 3, generator=generator) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(image_path, quality=95)
    label_image = Image.fromarray(label.to(torch.uint8).numpy())  # greyscale "L": values are ids
    if palette:  # VOC's labels are palette PNGs whose indices are the class ids
        label_image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        assert label_image.mode == "P"
    label_image.save(label_path)


def _voc_tree(root, generator):
    voc = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    labels = {}
    for k, name in enumerate(["2007_000032", "2007_000039", "2008_000123"]):
        label = torch.zeros(13, 17, dtype=torch.long)
        label[2:6, 3:9] = 15
        label[7:11, 10:15] = 16 + k
        label[6, :] = 255  # VOC's object borders
        labels[name] = label
        _write_pair(
            voc / "JPEGImages" / f"{name}.jpg",
            voc / "SegmentationClass" / f"{name}.png",
            label,
            generator,
            palette=True,
        )
        aug = label.clone()
        aug[0, 0] = 3  # the SBD label differs, so the test can tell which file was read
        _write_pair(
            voc / "JPEGImages" / f"{name}.jpg",
            root / "SegmentationClassAug" / f"{name}.png",
            aug,
            generator,
            palette=False,
        )
        labels[name, "aug"] = aug
    (voc / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n2007_000039\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("2008_000123\n")
    # MiB's list format: "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"
    (root / "train_aug.txt").write_text(
        "".join(
            f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n"
            for n in ["2007_000039", "2007_000032", "2008_000123"]
        )
    )
    return labels


def test_voc_reader(tmp_path, generator):
    labels = _voc_tree(tmp_path, generator)
    train = VOCSegmentation(str(tmp_path), "train")  # SBD-augmented list by default
    assert len(train) == 3
    image, label = train[0]
    assert image.shape == (3, 13, 17) and image.dtype == torch.float32
    assert label.dtype == torch.long and torch.equal(label, labels["2007_000039", "aug"])
    assert train.classes_in(0) == {0, 3, 15, 17}  # ignore is not a class

    plain = VOCSegmentation(str(tmp_path), "train", augmented=False)
    assert len(plain) == 2 and torch.equal(plain[1][1], labels["2007_000039"])
    val = VOCSegmentation(str(tmp_path), "val", normalize=False)
    raw_image, val_label = val[0]
    assert torch.equal(val_label, labels["2008_000123"])
    assert 0 <= raw_image.min() and raw_image.max() <= 1
    assert train.cache_key != plain.cache_key != val.cache_key


def test_voc_missing_paths(tmp_path, generator):
    with pytest.raises(FileNotFoundError, match="VOC2012"):
        VOCSegmentation(str(tmp_path), "train")
    _voc_tree(tmp_path, generator)
    (tmp_path / "train_aug.txt").unlink()
    with pytest.raises(FileNotFoundError, match="train_aug.txt"):
        VOCSegmentation(str(tmp_path), "train")
    (tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2008_000123.png").unlink()
    with pytest.raises(FileNotFoundError, match="2008_000123.png"):
        VOCSegmentation(str(tmp_path), "val")
    with pytest.raises(ValueError, match="split"):
        VOCSegmentation(str(tmp_path), "test")


def _ade_tree(root, generator):
    base = root / "ADEChallengeData2016"
    labels = {}
    for split in ("training", "validation"):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for k in range(2):
            name = f"ADE_{split[:5]}_{k:08d}"
            label = torch.randint(1, 151, (9, 11), generator=generator)
            label[:2] = 0  # void
            labels[split, k] = label
            _write_pair(
                base / "images" / split / f"{name}.jpg",
                base / "annotations" / split / f"{name}.png",
                label,
                generator,
                palette=False,
            )
    return labels


def test_ade_reader_void_is_background_in_train_ignored_in_val(tmp_path, generator):
    labels = _ade_tree(tmp_path, generator)
    train = ADE20KSegmentation(str(tmp_path), "train")
    val = ADE20KSegmentation(str(tmp_path), "val")
    assert len(train) == 2 and len(val) == 2
    assert torch.equal(train[1][1], labels["training", 1])
    val_label = val[0][1]
    expected = labels["validation", 0].clone()
    expected[expected == 0] = 255
    assert torch.equal(val_label, expected)
    assert 0 in train.classes_in(0) and 0 not in val.classes_in(0)
    assert val.classes_in(0) == frozenset(labels["validation", 0].unique().tolist()) - {0}


def test_ade_missing_paths(tmp_path, generator):
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        ADE20KSegmentation(str(tmp_path), "train")
    _ade_tree(tmp_path, generator)
    missing = tmp_path / "ADEChallengeData2016/annotations/validation/ADE_valid_00000001.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match="ADE_valid_00000001.png"):
        ADE20KSegmentation(str(tmp_path), "val")


# ---------------------------------------------------------------- build_dataset


def test_build_dataset(tmp_path, generator):
    synthetic = build_dataset("synthetic", "val", image_size=24, num_images=3, seed=2)
    assert isinstance(synthetic, SyntheticSegmentation) and synthetic[0][0].shape == (3, 24, 24)
    _voc_tree(tmp_path, generator)
    voc_train = build_dataset("voc", "train", root=str(tmp_path), image_size=8)
    image, label = voc_train[0]
    assert image.shape == (3, 8, 8) and label.shape == (8, 8)  # scaled, cropped
    voc_val = build_dataset("voc", "val", root=str(tmp_path), image_size=10)
    assert voc_val[0][1].shape == (10, 10)  # shorter side resized, centre crop
    raw = build_dataset("voc", "val", root=str(tmp_path), augment=False)
    assert raw[0][1].shape == (13, 17)
    with pytest.raises(ValueError, match="root"):
        build_dataset("voc", "train")
    with pytest.raises(ValueError, match="name"):
        build_dataset("coco", "train")
    with pytest.raises(ValueError, match="split"):
        build_dataset("synthetic", "test")


def test_colour_label_is_rejected(tmp_path, generator):
    _voc_tree(tmp_path, generator)
    Image = pytest.importorskip("PIL.Image")
    rgb = (torch.rand(13, 17, 3, generator=generator) * 255).to(torch.uint8).numpy()
    Image.fromarray(rgb).save(tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2008_000123.png")
    val = VOCSegmentation(str(tmp_path), "val")
    with pytest.raises(ValueError, match="2008_000123.png"):
        val[0]


# ---------------------------------------------------------------- data errors name the file


def _damage(path, how):
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"not an image\n"}[how])


@pytest.mark.parametrize("how", ["truncated", "empty", "text"])
@pytest.mark.parametrize("which", ["image", "label"])
def test_a_bad_file_is_named_by_the_check_and_by_the_reader(tmp_path, generator, how, which):
    _voc_tree(tmp_path, generator)
    train = VOCSegmentation(str(tmp_path), "train")
    bad = train.pairs[1][0 if which == "image" else 1]
    _damage(Path(bad), how)
    with pytest.raises(DataFileError) as error:
        train.check_files(range(len(train)))
    assert str(error.value).startswith(f"{which} {bad} ") and "\n" not in str(error.value)
    train.check_files([0, 2])  # the other images are fine
    with pytest.raises(DataFileError, match=f"{which} {bad} "):
        train[1]


def test_the_check_reports_sizes_modes_and_missing_files(tmp_path, generator):
    Image = pytest.importorskip("PIL.Image")
    _voc_tree(tmp_path, generator)
    train = VOCSegmentation(str(tmp_path), "train")
    Image.new("L", (5, 4)).save(train.pairs[0][1])  # a label of another size than its image
    Image.new("RGB", (17, 13)).save(train.pairs[1][1], format="PNG")  # a colour label
    Path(train.pairs[2][0]).unlink()
    with pytest.raises(DataFileError) as error:
        train.check_files(range(3))
    message = str(error.value)
    assert message.startswith(f"label {train.pairs[0][1]} is 4x5 but its image {train.pairs[0][0]} is 13x17")
    assert message.endswith("(and 2 more bad files)")


def test_a_file_without_its_end_marker_that_decodes_passes(tmp_path, generator):
    _ade_tree(tmp_path, generator)
    val = ADE20KSegmentation(str(tmp_path), "val")
    label = Path(val.pairs[0][1])
    label.write_bytes(label.read_bytes()[:-12])  # no IEND chunk: Pillow still reads the pixels
    val.check_files(range(len(val)))
    assert val[0][1].shape == (9, 11)


def test_an_image_list_that_is_not_text_is_named(tmp_path, generator):
    _voc_tree(tmp_path, generator)
    (tmp_path / "train_aug.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataFileError, match="train_aug.txt is not a text file"):
        VOCSegmentation(str(tmp_path), "train")
