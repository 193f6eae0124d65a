"""SSUL and DKD (the sigmoid methods): their targets, heads, prediction rules, loss parts and the
saliency maps they read (the end-to-end and resume runs are in test_train.py)."""

from pathlib import Path

import pytest
import torch

from incseg_fast.data import DataFileError, IncrementalSubset, SyntheticSegmentation, VOCSegmentation, train_label_lut
from incseg_fast.data import transforms as T
from incseg_fast.models import IncrementalSegmenter
from incseg_fast.train import TrainConfig
from incseg_fast.train.methods import Batch, head_layout, ssul_targets
from incseg_fast.train.trainer import StepPlan

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- SSUL's targets, the heads


def test_ssul_targets_shift_the_labels_and_mark_salient_background_unknown():
    labels = torch.tensor([[0, 0, 3, 255, 0]])
    saliency = torch.tensor([[True, False, True, True, False]])
    # unknown 0, background 1, class c -> c + 1; ignored stays ignored even where salient
    assert ssul_targets(labels, saliency).tolist() == [[0, 1, 4, 255, 1]]


def test_head_layouts():
    ssul, dkd, mib = (TrainConfig(method=m).resolved().method_spec for m in ("ssul", "dkd", "mib"))
    assert head_layout(ssul, [16, 5]) == [1, 16, 5]  # unknown, background + classes 1-15, new
    assert head_layout(dkd, [16, 5]) == [1, 15, 5]  # auxiliary channel 0 in place of the background
    assert head_layout(mib, [16, 5]) == [16, 5]


def test_a_sigmoid_head_needs_a_one_channel_first_head():
    with pytest.raises(ValueError, match="one-channel first head"):
        IncrementalSegmenter("tiny", [16, 5], output="sigmoid_unknown")
    with pytest.raises(ValueError, match="output must be one of"):
        IncrementalSegmenter("tiny", [16], output="sigmoid")


def test_new_classes_start_from_the_first_head():
    model = IncrementalSegmenter("tiny", [1, 4], output="sigmoid_unknown")
    with torch.no_grad():
        model.classifier.heads[0].weight.normal_()
        model.classifier.heads[0].bias.fill_(-1.5)
    new = model.classifier.add_step(3)
    model.classifier.init_from_first_head()
    for k in range(3):
        assert torch.equal(new.weight[k], model.classifier.heads[0].weight[0])
    assert new.bias.tolist() == [-1.5] * 3


def test_dkd_auxiliary_head_trains_nothing_before_it():
    model = IncrementalSegmenter("tiny", [1, 4], output="sigmoid_auxiliary")
    model(torch.randn(2, 3, 16, 16))["logits"][:, 0].sum().backward()
    assert model.classifier.heads[0].weight.grad.abs().sum() > 0
    for p in [*model.head.parameters(), *model.encoder.parameters()]:
        assert p.grad is None or not p.grad.any()


# ---------------------------------------------------------------- the evaluation rules


def _logit(p):
    return torch.logit(torch.tensor(p, dtype=torch.float64))


def test_ssul_prediction_adds_the_unknown_probability_to_the_background():
    model = IncrementalSegmenter("tiny", [1, 3], output="sigmoid_unknown")
    # channels: unknown, background, class 1, class 2; one pixel each
    probabilities = [
        [0.5, 0.1, 0.2, 0.7],  # background 0.1 + unknown 0.5 = 0.6 < 0.7: class 2
        [0.3, 0.35, 0.6, 0.1],  # 0.65 > 0.6: background, although class 1 beats each of the two
        [0.9, 0.01, 0.1, 0.2],  # the unknown alone makes it background
    ]
    logits = _logit([[[[p[c]] for p in probabilities] for c in range(4)]])  # (1, 4, 3, 1)
    assert model.predict(logits)[0, :, 0].tolist() == [2, 0, 0]


def test_dkd_prediction_is_background_where_no_class_passes_one_half():
    model = IncrementalSegmenter("tiny", [1, 3], output="sigmoid_auxiliary")
    # channels: auxiliary, class 1, class 2, class 3 (the auxiliary channel never predicts)
    probabilities = [[0.99, 0.4, 0.45, 0.1], [0.99, 0.6, 0.8, 0.1], [0.0, 0.51, 0.2, 0.3], [0.9, 0.5, 0.5, 0.5]]
    logits = _logit([[[[p[c]] for p in probabilities] for c in range(4)]])
    assert model.predict(logits)[0, :, 0].tolist() == [0, 2, 1, 0]


def test_softmax_prediction_is_the_argmax():
    model = IncrementalSegmenter("tiny", [3])
    logits = torch.randn(2, 3, 5, 7)
    assert torch.equal(model.predict(logits), logits.argmax(1))


# ---------------------------------------------------------------- the loss parts change the update


def _batch(method, step=1, saliency=True, **options):
    """A Batch of step ``step`` of the synthetic 15-5 task on random images; at step 1 the old model
    is a random step-0 network (its classes confident somewhere) and the student starts from it."""
    cfg = TrainConfig(method=method, **options).resolved()
    plan, spec = StepPlan(cfg, step), cfg.method_spec
    torch.manual_seed(0)
    student = IncrementalSegmenter("tiny", head_layout(spec, plan.classes_per_step[:1]), output=spec.output)
    old = old_out = None
    images = torch.randn(2, 3, 16, 16)
    if step == 1:
        old = IncrementalSegmenter("tiny", head_layout(spec, plan.classes_per_step[:1]), output=spec.output)
        with torch.no_grad():
            old.classifier.heads[-1].bias.add_(torch.linspace(-3, 3, old.classifier.heads[-1].out_channels))
            old_out = old.eval()(images, upsample=False)
        student.load_state_dict(old.state_dict())
        student.classifier.add_step(plan.classes_per_step[-1])
        student.classifier.init_from_first_head()
    labels = torch.randint(0, 2, (2, 16, 16)) * torch.randint(plan.previous_classes, plan.num_classes, (2, 16, 16))
    labels[:, 0] = 255
    out = student(images, upsample=False)
    salient = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(1)) < 0.5 if saliency else None
    return Batch(cfg, plan, student, old, out, old_out, labels, (16, 16), {}, salient)


def _gradient(batch):
    loss = sum(batch.cfg.method_spec.terms(batch).values())
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, batch.student.classifier.parameters())])


def _differs(options, changed, change_batch=None):
    """Whether ``changed`` options (or ``change_batch``) change the gradient of the method's loss."""
    batch = _batch(**{**options, **changed})
    if change_batch is not None:
        change_batch(batch)
    return not torch.allclose(_gradient(_batch(**options)), _gradient(batch))


def test_ssul_pseudo_labels_and_saliency_change_the_update():
    ssul = dict(method="ssul", pseudo_threshold=0.5)
    batch = _batch(**ssul)
    assert list(batch.cfg.method_spec.terms(batch)) == ["ce"]
    assert _differs(ssul, dict(pseudo_labels=False))
    assert _differs(ssul, dict(pseudo_threshold=0.999))
    # where the old model is confident the pseudo-labels replace the unknown: saliency without them
    no_saliency = lambda b: setattr(b, "saliency", torch.zeros_like(b.saliency))  # noqa: E731
    assert _differs(dict(ssul, pseudo_labels=False), {}, no_saliency)


def test_ssul_refuses_a_batch_without_saliency():
    batch = _batch("ssul", saliency=False)
    with pytest.raises(ValueError, match="saliency"):
        batch.cfg.method_spec.terms(batch)


def test_dkd_terms_and_each_part_changes_the_update():
    batch = _batch("dkd")
    assert list(batch.cfg.method_spec.terms(batch)) == ["wbce", "ac", "kd", "dkd"]
    for option in ("lambda_kd", "lambda_dkd", "lambda_ac"):
        assert _differs(dict(method="dkd"), {option: 0.0}), option
    assert _differs(dict(method="dkd"), dict(pos_weight=3.0))
    assert "dkd" not in _batch("dkd", lambda_dkd=0.0).cfg.method_spec.terms(_batch("dkd", lambda_dkd=0.0))


@pytest.mark.parametrize("method, terms", [("dkd", ["wbce", "ac"]), ("ssul", ["ce"])])
def test_step0_has_no_distillation(method, terms):
    batch = _batch(method, step=0)
    assert list(batch.cfg.method_spec.terms(batch)) == terms
    assert _gradient(batch).abs().sum() > 0


# ---------------------------------------------------------------- options


def test_option_defaults_and_ranges():
    ssul = TrainConfig(method="ssul").resolved()
    assert (ssul.pseudo_labels, ssul.pseudo_threshold) == (True, 0.7)
    dkd = TrainConfig(method="dkd").resolved()
    assert (dkd.lambda_kd, dkd.lambda_dkd, dkd.lambda_ac, dkd.pos_weight) == (5.0, 5.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="--pseudo-threshold must be a finite number in"):
        TrainConfig(method="ssul", pseudo_threshold=1.5).resolved()
    with pytest.raises(ValueError, match="ade reader reads none"):
        TrainConfig(method="ssul", dataset="ade", root="x").resolved()


# ---------------------------------------------------------------- saliency maps


def test_synthetic_saliency_marks_every_object_and_follows_the_transform():
    plain = SyntheticSegmentation(num_images=4, image_size=24, normalize=False)
    flipped = SyntheticSegmentation(
        num_images=4, image_size=24, normalize=False, saliency=True, transform=T.RandomHorizontalFlip(p=1.0)
    )
    for i in range(4):
        image, label = plain[i]
        f_image, f_label, f_saliency = flipped[i]
        assert torch.equal(f_image, image.flip(-1)) and torch.equal(f_label, label.flip(-1))
        assert f_saliency.dtype == torch.bool and torch.equal(f_saliency, f_label > 0)
        assert 0 < f_saliency.sum() < f_saliency.numel()


def test_saliency_marks_the_objects_a_step_labels_background():
    data = SyntheticSegmentation(num_images=30, image_size=24, saliency=True)
    steps = [list(range(16)), list(range(16, 21))]
    subset = IncrementalSubset(data, range(30), train_label_lut(steps, 1))
    relabelled = 0
    for i in range(30):
        _, raw, _ = data[i]
        _, label, saliency = subset[i]
        assert torch.equal(saliency, raw > 0)
        relabelled += int(((label == 0) & saliency).sum())  # old classes: background, yet salient
    assert relabelled > 0


def test_a_crop_pads_saliency_with_not_salient():
    image, label = torch.rand(3, 5, 6), torch.randint(0, 21, (5, 6))
    saliency = torch.rand(5, 6) < 0.5
    crop = T.RandomCrop(8, generator=torch.Generator().manual_seed(0))
    _, got_label, got_saliency = T.with_saliency(crop, image, label, saliency)
    assert torch.equal(got_label[:5, :6], label) and (got_label[5:] == 255).all()
    assert torch.equal(got_saliency[:5, :6], saliency) and not got_saliency[5:].any()


def _voc_with_saliency(root, generator):
    Image = pytest.importorskip("PIL.Image")
    from test_data import _voc_tree

    _voc_tree(root, generator)
    folder = root / "VOCdevkit" / "VOC2012" / "saliency_map"
    folder.mkdir()
    maps = {}
    for name in ["2007_000032", "2007_000039", "2008_000123"]:
        values = (torch.rand(13, 17, generator=generator) * 3).floor().to(torch.uint8) * 100  # 0, 100, 200
        Image.fromarray(values.numpy()).save(folder / f"{name}.png")
        maps[name] = values > 0
    return maps


def test_voc_reads_ssul_saliency_maps(tmp_path, generator):
    maps = _voc_with_saliency(tmp_path, generator)
    train = VOCSegmentation(str(tmp_path), "train", saliency=True)
    train.check_files(range(3))
    image, label, saliency = train[0]  # train_aug.txt lists 2007_000039 first
    assert torch.equal(saliency, maps["2007_000039"]) and label.shape == saliency.shape
    assert len(VOCSegmentation(str(tmp_path), "train")[0]) == 2  # no saliency unless asked


def test_voc_saliency_errors_name_the_file(tmp_path, generator):
    Image = pytest.importorskip("PIL.Image")
    _voc_with_saliency(tmp_path, generator)
    folder = tmp_path / "VOCdevkit" / "VOC2012" / "saliency_map"
    (folder / "2007_000039.png").unlink()  # the first of the list: refused when the dataset is built
    with pytest.raises(FileNotFoundError, match="saliency map not found: .*2007_000039.png"):
        VOCSegmentation(str(tmp_path), "train", saliency=True)
    Image.new("RGB", (17, 13)).save(folder / "2007_000039.png")  # a colour map
    (folder / "2007_000032.png").write_bytes(b"not an image\n")
    train = VOCSegmentation(str(tmp_path), "train", saliency=True)
    with pytest.raises(DataFileError) as error:
        train.check_files(range(3))
    assert str(error.value).startswith(f"saliency map {folder / '2007_000039.png'} must be a greyscale PNG")
    assert str(error.value).endswith("(and 1 more bad files)")
    with pytest.raises(DataFileError, match=f"saliency map {folder / '2007_000032.png'} is not an image file"):
        train[1]
    Image.new("L", (5, 4)).save(folder / "2007_000032.png")
    with pytest.raises(DataFileError, match=r"saliency map .*2007_000032.png is \(4, 5\) but its image"):
        train[1]
    with pytest.raises(DataFileError, match="2007_000032.png is 4x5 but its image"):
        train.check_files([1])
    (folder.rename(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="saliency_map"):
        VOCSegmentation(str(tmp_path), "train", saliency=True)
    assert Path(tmp_path / "elsewhere").is_dir()


# ---------------------------------------------------------------- training


def test_ssul_trains_only_the_unknown_and_the_new_head(tmp_path):
    from test_train import tiny_config

    from incseg_fast.train import evaluate_checkpoint, run
    from incseg_fast.train.trainer import load_checkpoint

    cfg = tiny_config(tmp_path, "ssul", train_images=24, val_images=8)
    entries = run(cfg)
    before, after = (load_checkpoint(tmp_path / "ssul" / f"step{k}.pt") for k in (0, 1))
    assert before["model"]["output"] == after["model"]["output"] == "sigmoid_unknown"
    assert after["model"]["classes_per_step"] == [1, 16, 5]
    changed = {k for k, v in before["state_dict"].items() if not torch.equal(v, after["state_dict"][k])}
    # the encoder, the decoder (batch-norm statistics included) and the old classes' head are frozen
    assert changed == {"classifier.heads.0.weight", "classifier.heads.0.bias"}
    new, unknown = after["state_dict"]["classifier.heads.2.bias"], before["state_dict"]["classifier.heads.0.bias"]
    assert not torch.equal(new, unknown.expand_as(new))  # started as the unknown's copies, then learnt
    assert evaluate_checkpoint(tmp_path / "ssul" / "step1.pt", device="cpu")["iou"] == entries[-1]["iou"]


def test_a_softmax_step0_is_refused_by_a_sigmoid_method(tmp_path):
    from test_train import tiny_config

    from incseg_fast.train import train_step

    train_step(tiny_config(tmp_path / "ft", train_images=16, val_images=8), 0)
    cfg = tiny_config(tmp_path / "dkd", "dkd", step0_checkpoint=str(tmp_path / "ft" / "ft" / "step0.pt"))
    with pytest.raises(ValueError, match="step0-checkpoint .* different architecture"):
        train_step(cfg, 0)
