"""Models: torchvision-compatible ResNets, output stride, the incremental classifier, CAF modules."""

import math

import pytest
import torch

from incseg_fast.models import (
    ContinualAttentiveFusion,
    IncrementalClassifier,
    IncrementalSegmenter,
    NonLocalProjection,
    build_backbone,
    load_pretrained,
)

# torchvision's ResNet parameter counts minus its 1000-class fc layer (in_features * 1000 + 1000)
TORCHVISION_BACKBONE_PARAMS = {
    "resnet18": 11_689_512 - (512 * 1000 + 1000),
    "resnet50": 25_557_032 - (2048 * 1000 + 1000),
    "resnet101": 44_549_160 - (2048 * 1000 + 1000),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_BACKBONE_PARAMS))
def test_backbone_matches_torchvision_layout(name):
    backbone = build_backbone(name)
    assert sum(p.numel() for p in backbone.parameters()) == TORCHVISION_BACKBONE_PARAMS[name]
    keys = set(backbone.state_dict())
    expected = {
        "conv1.weight",
        "bn1.running_mean",
        "bn1.num_batches_tracked",
        "layer1.0.conv1.weight",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_var",
        "layer4.1.bn2.bias",
    }
    if name != "resnet18":
        expected |= {"layer1.0.conv3.weight", "layer1.0.downsample.1.weight", "layer4.2.bn3.running_mean"}
    if name == "resnet101":
        expected.add("layer3.22.conv2.weight")
    assert expected <= keys
    assert not any(k.startswith("fc.") for k in keys)


@pytest.mark.parametrize(
    "name,output_stride,side", [("resnet18", 16, 4), ("resnet18", 8, 8), ("tiny", 8, 8), ("tiny", 16, 4)]
)
def test_output_stride(name, output_stride, side):
    backbone = build_backbone(name, output_stride).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, backbone.out_channels, side, side)


def test_torchvision_state_dict_round_trip(tmp_path):
    source = build_backbone("resnet18")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in source.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    state = dict(source.state_dict())
    state["fc.weight"] = torch.randn(1000, 512)  # a torchvision file carries its classifier too
    state["fc.bias"] = torch.randn(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)

    model = IncrementalSegmenter("resnet18", [16])
    load_pretrained(model.encoder, path)
    loaded = model.encoder.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_pretrained_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(build_backbone("resnet50").state_dict(), path)
    with pytest.raises(ValueError, match="does not match"):
        load_pretrained(build_backbone("resnet18"), path)
    with pytest.raises(FileNotFoundError):
        load_pretrained(build_backbone("resnet18"), tmp_path / "missing.pth")
    for name, contents in (("text.pth", b"not weights\n"), ("cut.pth", path.read_bytes()[:1000])):
        (tmp_path / name).write_bytes(contents)
        with pytest.raises(ValueError, match=f"pretrained weights .*{name} cannot be loaded: [^\n]*$"):
            load_pretrained(build_backbone("resnet18"), tmp_path / name)


def test_unknown_backbone_and_stride():
    with pytest.raises(ValueError, match="backbone"):
        build_backbone("resnet34")
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("resnet18", 4)


def test_forward_outputs_and_growth():
    torch.manual_seed(0)
    model = IncrementalSegmenter("tiny", [16], output_stride=8).eval()
    images = torch.randn(2, 3, 40, 44)
    with torch.no_grad():
        out = model(images)
    assert out["logits"].shape == (2, 16, 40, 44)
    assert out["encoder"].shape == (2, model.encoder.out_channels, 5, 6)
    assert out["features"].shape == (2, 64, 5, 6)
    model.classifier.add_step(5)
    with torch.no_grad():
        grown = model(images)["logits"]
    assert grown.shape == (2, 21, 40, 44)
    assert torch.allclose(grown[:, :16], out["logits"], atol=1e-6)  # old heads unchanged
    assert model.config()["classes_per_step"] == [16, 5]


def test_balanced_init_math():
    torch.manual_seed(0)
    classifier = IncrementalClassifier(8, [16])
    with torch.no_grad():
        classifier.heads[0].bias.uniform_(-1, 1)
    bg_weight = classifier.heads[0].weight[0].clone()
    bg_bias = classifier.heads[0].bias[0].item()
    old_biases = classifier.heads[0].bias[1:].clone()
    classifier.add_step(5)
    classifier.balanced_init()
    shift = math.log(6)
    new = classifier.heads[1]
    assert torch.equal(new.weight, bg_weight[None].expand(5, -1, -1, -1))
    assert torch.allclose(new.bias, torch.full((5,), bg_bias - shift))
    assert math.isclose(classifier.heads[0].bias[0].item(), bg_bias - shift, rel_tol=1e-6)
    assert torch.equal(classifier.heads[0].bias[1:], old_biases)

    # the point of it: the old background probability is shared evenly by background + new classes
    features = torch.randn(3, 8, 4, 4)
    before = IncrementalClassifier(8, [16])
    before.heads[0].load_state_dict(
        {"weight": classifier.heads[0].weight, "bias": torch.cat([torch.tensor([bg_bias]), old_biases])}
    )
    with torch.no_grad():
        p_before = before(features).softmax(1)
        p_after = classifier(features).softmax(1)
    assert torch.allclose(p_after[:, 1:16], p_before[:, 1:16], atol=1e-6)
    for c in [0, *range(16, 21)]:
        assert torch.allclose(p_after[:, c], p_before[:, 0] / 6, atol=1e-6)


def test_balanced_init_needs_a_new_step():
    with pytest.raises(ValueError, match="step > 0"):
        IncrementalClassifier(8, [16]).balanced_init()


def test_caf_module_starts_as_the_identity():
    """It joins a trained network at step 1: the projection, the fusion (the new projection only)
    and the structured attention (A_CH = 0) start by passing the features through."""
    torch.manual_seed(0)
    caf = ContinualAttentiveFusion(12).eval()
    z = torch.randn(2, 12, 5, 7)
    with torch.no_grad():
        alone, projected = caf(z)
        fused, _ = caf(z, torch.randn(2, 12, 5, 7))
    assert torch.equal(projected, z)
    assert torch.allclose(alone, z) and torch.allclose(fused, z)


def test_caf_structured_attention_is_bounded():
    """The gates keep 1 + A_CH (x) A_SP in (0, 2) whatever the weights: z-bar stays linear in v."""
    torch.manual_seed(0)
    caf = ContinualAttentiveFusion(12).eval()
    with torch.no_grad():
        for p in (caf.spatial.weight, caf.channel.weight):
            p.copy_(1e3 * torch.randn_like(p))
        z = 10 * torch.randn(2, 12, 5, 7)
        out, projected = caf(z)
    ratio = out / projected
    assert bool(((ratio > -1e-6) & (ratio < 2 + 1e-6)).all())
    assert float(ratio.min()) < 0.5 and float(ratio.max()) > 1.5  # the weights do reach both sides


def test_caf_modules_join_a_trained_model_without_changing_it():
    torch.manual_seed(0)
    model = IncrementalSegmenter("tiny", [16]).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
        model.add_fusion()
        model.add_squeeze_excitation()
        after = model(images, before["projected"])
    assert torch.allclose(after["logits"], before["logits"], atol=1e-5)
    assert model.config()["caf"] and model.config()["se_blocks"]
    rebuilt = IncrementalSegmenter(**model.config())
    rebuilt.load_state_dict(model.state_dict())


def test_caf_model_exposes_distillation_inputs():
    torch.manual_seed(0)
    model = IncrementalSegmenter("tiny", [16], caf=True).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert set(out) == {"logits", "encoder", "features", "projected"}
    a = model.se_encoder(out["encoder"])
    assert a.shape == out["encoder"].shape[:2] and bool(((a > 0) & (a < 1)).all())


def test_non_local_projection_starts_as_identity_and_mixes_positions():
    torch.manual_seed(0)
    block = NonLocalProjection(12).eval()
    z = torch.randn(2, 12, 5, 7)
    with torch.no_grad():
        assert torch.equal(block(z), z)
        block.out[1].weight.fill_(1.0)
        before = block(z)
        changed = z.clone()
        changed[:, :, 0, 0] += 1.0  # one corner pixel
        after = block(changed)
    assert not torch.allclose(after[:, :, 4, 6], before[:, :, 4, 6])  # reaches the opposite corner
