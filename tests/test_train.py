"""The trainer: tiny end-to-end runs of every method, resume, loss backends, reports."""

import dataclasses
import json
import math

import pytest
import torch

import incseg_fast as isf
from incseg_fast.train import METHODS, TrainConfig, evaluate_checkpoint, run, train_step
from incseg_fast.train.trainer import amp_dtype, load_checkpoint, model_from_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(out, method="ft", **overrides):
    """Seconds per step: 32x32 scenes, a few dozen images, one epoch."""
    base = dict(
        dataset="synthetic",
        task="15-5",
        mode="disjoint",
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
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def step0(tmp_path_factory):
    """One trained step 0 shared by the methods whose step 0 is plain cross-entropy."""
    out = tmp_path_factory.mktemp("step0")
    train_step(tiny_config(out), 0)
    return out / "ft" / "step0.pt"


def _check_entry(entry, step, num_classes):
    assert entry["step"] == step
    assert len(entry["iou"]) == num_classes
    for key in ("miou_old", "miou_all", "mpa", "mca"):
        assert 0.0 <= entry[key] <= 100.0
    assert entry["miou_new"] is None if step == 0 else 0.0 <= entry["miou_new"] <= 100.0
    assert all(v is None or 0.0 <= v <= 100.0 for v in entry["iou"])
    assert all(math.isfinite(h["loss"]) for h in entry["history"])


@pytest.mark.parametrize("method", list(METHODS))
def test_method_end_to_end(tmp_path, step0, method):
    cfg = tiny_config(tmp_path, method)
    if method in ("ft", "lwf", "ilt", "mib", "plop"):
        cfg.step0_checkpoint = str(step0)
    entries = run(cfg)
    if method == "joint":
        assert len(entries) == 1
        _check_entry(entries[0], 1, 21)
    else:
        assert len(entries) == 2
        _check_entry(entries[0], 0, 16)
        _check_entry(entries[1], 1, 21)
        assert (tmp_path / method / "step0.pt").exists()
    assert (tmp_path / method / "step1.pt").exists()
    assert not list((tmp_path / method).glob("*.partial.pt"))  # removed once a step is final

    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == [method]
    assert results[method][-1] == {"step": 1, **{k: entries[-1][k] for k in ("miou_old", "miou_new", "miou_all")}}
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0] == "| method | step | old (0-15) | new (16-20) | all |"
    assert table[2].startswith(f"| {method} | 1 | ")
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,step,miou_old,miou_new,miou_all,mpa,mca,iou_0,")
    assert len(csv_lines) == 1 + len(entries)
    assert (tmp_path / "miou.png").stat().st_size > 0


class Interrupt(Exception):
    pass


def _interrupt_after(epoch_to_stop):
    def hook(epoch):
        if epoch == epoch_to_stop:
            raise Interrupt

    return hook


# plop: its thresholds are prepared again on resume; ssul, dkd: their own step 0, ssul's saliency maps
@pytest.mark.parametrize("method", ["mib", "plop", "ssul", "dkd"])
def test_interrupted_step_resumes_to_the_same_result(tmp_path, step0, method):
    settings = dict(method=method, epochs_incremental=3)
    if METHODS[method].output == "softmax":
        settings["step0_checkpoint"] = str(step0)
    straight = tiny_config(tmp_path / "straight", **settings)
    resumed = tiny_config(tmp_path / "resumed", **settings)
    train_step(straight, 0)
    train_step(resumed, 0)
    expected = train_step(straight, 1)

    with pytest.raises(Interrupt):
        train_step(resumed, 1, on_epoch_end=_interrupt_after(0))
    assert (tmp_path / "resumed" / method / "step1.partial.pt").exists()
    assert not (tmp_path / "resumed" / method / "step1.pt").exists()
    epochs_run = []
    got = train_step(resumed, 1, on_epoch_end=epochs_run.append)
    assert epochs_run == [1, 2]

    for key in ("iou", "miou_old", "miou_new", "miou_all", "mpa", "mca"):
        assert got[key] == expected[key], key
    assert [h["loss"] for h in got["history"]] == [h["loss"] for h in expected["history"]]
    a = load_checkpoint(tmp_path / "straight" / method / "step1.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "resumed" / method / "step1.pt")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.skipif("cpu" not in isf.available_backends(), reason="the compiled cpu backend is not built")
@pytest.mark.parametrize("method", ["mib", "lwf"])
def test_reference_and_fused_backends_train_alike(tmp_path, step0, method):
    results = {}
    for backend in ("reference", "cpu"):
        cfg = tiny_config(tmp_path / backend, method, loss_backend=backend, step0_checkpoint=str(step0))
        results[backend] = run(cfg)[-1]
    ref, fused = results["reference"], results["cpu"]
    for key in ("miou_old", "miou_new", "miou_all", "mpa", "mca"):
        assert fused[key] == pytest.approx(ref[key], abs=0.05), key
    assert fused["history"][0]["loss"] == pytest.approx(ref["history"][0]["loss"], rel=1e-4)


@pytest.mark.skipif("cpu" not in isf.available_backends(), reason="the compiled cpu backend is not built")
def test_fused_upsampling_trains_like_materialised_logits(tmp_path, step0):
    """The losses' size= (logits at the network's resolution), the reference backend (interpolate,
    then the loss) and --materialise-upsampled-logits (the model interpolates) train alike."""
    variants = {
        "fused": dict(loss_backend="cpu"),
        "reference": dict(loss_backend="reference"),
        "materialised": dict(loss_backend="cpu", materialise_upsampled_logits=True),
    }
    results = {}
    for name, overrides in variants.items():
        cfg = tiny_config(tmp_path / name, "mib", step0_checkpoint=str(step0), **overrides)
        results[name] = run(cfg)[-1]
    fused = results["fused"]
    for name in ("reference", "materialised"):
        for key in ("miou_old", "miou_new", "miou_all", "mpa", "mca"):
            assert fused[key] == pytest.approx(results[name][key], abs=0.05), (name, key)
        assert fused["history"][0]["loss"] == pytest.approx(results[name]["history"][0]["loss"], rel=1e-4), name


def test_model_returns_logits_at_its_own_resolution_without_upsample(tmp_path, step0):
    model = model_from_checkpoint(load_checkpoint(step0), "cpu")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        low = model(images, upsample=False)["logits"]
        full = model(images)["logits"]
    assert low.shape[-2:] == (32 // model.encoder.output_stride,) * 2
    torch.testing.assert_close(full, torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear"))


def test_mib_starts_step1_from_the_balanced_initialisation(tmp_path, step0):
    # lr 0 at step 1: the new classifier keeps its initial weights
    cfg = tiny_config(tmp_path, "mib", step0_checkpoint=str(step0), lr_incremental=0.0)
    run(cfg)
    old = load_checkpoint(step0)["state_dict"]
    new = load_checkpoint(tmp_path / "mib" / "step1.pt")["state_dict"]
    shift = math.log(6)
    assert torch.equal(new["classifier.heads.1.weight"], old["classifier.heads.0.weight"][:1].expand(5, -1, -1, -1))
    assert torch.allclose(new["classifier.heads.1.bias"], old["classifier.heads.0.bias"][0] - shift)
    assert torch.allclose(new["classifier.heads.0.bias"][0], old["classifier.heads.0.bias"][0] - shift)


def test_ilt_frozen_encoder_keeps_step0_encoder(tmp_path, step0):
    cfg = tiny_config(tmp_path, "ilt", step0_checkpoint=str(step0), freeze_encoder=True)
    run(cfg)
    old = load_checkpoint(step0)["state_dict"]
    new = load_checkpoint(tmp_path / "ilt" / "step1.pt")["state_dict"]
    encoder_keys = [k for k in old if k.startswith("encoder.")]
    assert encoder_keys
    for key in encoder_keys:
        assert torch.equal(new[key], old[key]), key
    assert not torch.equal(new["head.last.0.weight"], old["head.last.0.weight"])  # the rest did train


def test_bf16_autocast_on_cpu(tmp_path):
    entry = train_step(tiny_config(tmp_path, amp="bf16"), 0)
    _check_entry(entry, 0, 16)


def test_evaluate_checkpoint_reproduces_recorded_metrics(tmp_path, step0):
    metrics = evaluate_checkpoint(step0, device="cpu", amp="none")
    recorded = load_checkpoint(step0)["metrics"]
    for key in ("iou", "miou_old", "miou_all", "mpa", "mca"):
        assert metrics[key] == recorded[key]


def test_bad_configuration_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="method"):
        tiny_config(tmp_path, "nope").resolved()
    with pytest.raises(ValueError, match="mode"):
        tiny_config(tmp_path, mode="sideways").resolved()
    with pytest.raises(ValueError, match="epochs"):
        tiny_config(tmp_path, epochs=0).resolved()
    with pytest.raises(ValueError, match="step"):
        train_step(tiny_config(tmp_path), 2)
    with pytest.raises(ValueError, match="fp16"):
        amp_dtype("fp16", torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="step 0"):
        train_step(tiny_config(tmp_path, "mib"), 1)


def test_step0_checkpoint_must_match_the_architecture(tmp_path, step0):
    cfg = dataclasses.replace(tiny_config(tmp_path, "mib", output_stride=8), step0_checkpoint=str(step0))
    with pytest.raises(ValueError, match="architecture"):
        train_step(cfg, 0)


def test_progress_line_reports_loss_and_throughput():
    import io

    from incseg_fast.train.progress import Progress

    stream = io.StringIO()
    progress = Progress(4, "[ft] step 0 epoch 1/1", stream=stream)
    for loss in (4.0, 2.0, 1.0, 1.0):
        progress.update(8, loss)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1  # not a terminal: one line when done
    assert lines[0].startswith("[ft] step 0 epoch 1/1 [####################] 100% loss 2.0000 ")
    assert lines[0].endswith(" img/s")


def _fake_voc(root):
    """A VOC-layout folder with 8 small images: every step of 15-5 finds training images."""
    Image = pytest.importorskip("PIL.Image")
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    generator = torch.Generator().manual_seed(3)
    names = [f"2007_{k:06d}" for k in range(8)]
    for k, name in enumerate(names):
        label = torch.zeros(37, 45, dtype=torch.uint8)
        label[3:15, 4:20] = 1 + k  # a step-0 class
        label[20:33, 22:40] = 16 + k % 5 if k % 2 else 9
        label[17, :] = 255  # an object border
        pixels = (torch.rand(37, 45, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{name}.jpg")
        for folder in (voc / "SegmentationClass", root / "SegmentationClassAug"):
            Image.fromarray(label.numpy()).save(folder / f"{name}.png")
    (root / "train_aug.txt").write_text("\n".join(names[:6]) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(names[6:]) + "\n")


def test_voc_layout_end_to_end(tmp_path):
    _fake_voc(tmp_path / "voc")
    cfg = TrainConfig(
        dataset="voc",
        root=str(tmp_path / "voc"),
        task="15-5",
        mode="overlapped",
        method="mib",
        out=str(tmp_path / "run"),
        backbone="tiny",
        output_stride=4,
        image_size=32,
        epochs=1,
        batch_size=2,
        device="cpu",
        progress=False,
    )
    entries = run(cfg)
    _check_entry(entries[0], 0, 16)
    _check_entry(entries[1], 1, 21)
    assert list((tmp_path / "run" / "cache").glob("voc-train-aug-*step1__overlapped.json"))


def test_reports_without_matplotlib(tmp_path, monkeypatch):
    import sys

    from incseg_fast.train.checkpoint import make_payload, save_checkpoint
    from incseg_fast.train.results import write_reports

    (tmp_path / "ft").mkdir()
    entry = {
        "step": 0,
        "iou": [90.0, None, 10.0],
        "miou_old": 50.0,
        "miou_new": None,
        "miou_all": 50.0,
        "mpa": 91.0,
        "mca": 60.0,
    }
    fields = dict(model={}, state_dict={}, config={}, task_steps=[], train_steps=[], index=0)
    payload = make_payload("step", metrics=entry, identity={"method": "ft", "step": 0}, **fields)
    save_checkpoint(payload, tmp_path / "ft" / "step0.pt")  # the reports come from the checkpoints
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    report = write_reports(tmp_path)
    assert "matplotlib" in report["plot_message"]
    assert not (tmp_path / "miou.png").exists()
    assert report["results"] == {"ft": [{"step": 0, "miou_old": 50.0, "miou_new": None, "miou_all": 50.0}]}
    assert (tmp_path / "results.csv").read_text().splitlines()[
        1
    ] == "ft,0,50.0000,,50.0000,91.0000,60.0000,90.0000,,10.0000"
    assert "| ft | 0 | 50.0 | - | 50.0 |" in report["table"]


def test_the_loss_backend_runs_the_structured_attention_of_the_new_and_the_old_model(tmp_path, monkeypatch):
    calls = []  # (backend, whether gradients are recorded: the new model in training; not: the old one)
    fused = isf.structured_attention

    def spy(v, a_ch, a_sp, *, backend="auto"):
        calls.append((backend, torch.is_grad_enabled()))
        return fused(v, a_ch, a_sp, backend=backend)

    monkeypatch.setattr(isf, "structured_attention", spy)
    # CAF's fusion module joins at step 1, so the old model has one from step 2 on
    cfg = tiny_config(tmp_path, "caf", task="15-1", loss_backend="reference", lambda_ad=1.0, train_images=160)
    run(cfg, steps=[0, 1, 2])
    assert ("reference", False) in calls and ("reference", True) in calls
    assert {backend for backend, _ in calls} == {"reference"}


def test_plop_parts_change_the_objective(tmp_path, step0):
    """Each of PLOP's parts (the pseudo-labels, Local POD) takes part in training: switching one off
    trains other weights."""
    weights = {}
    for name, options in {
        "plop": {},
        "no-pseudo": {"pseudo_labels": False},
        "no-pod": {"lambda_pod": 0.0, "lambda_pod_logits": 0.0},
    }.items():
        cfg = tiny_config(tmp_path / name, "plop", step0_checkpoint=str(step0), **options)
        run(cfg)
        weights[name] = load_checkpoint(tmp_path / name / "plop" / "step1.pt")["state_dict"]
    for other in ("no-pseudo", "no-pod"):
        assert any(not torch.equal(weights["plop"][k], weights[other][k]) for k in weights["plop"]), other
