"""GradCAM through edgeshort.spray on the ViT families it supports: prefix tokens read from each
model, grid from the token count, model unchanged. Separate from test_spray.py because importing
timm and transformers dominates its run time."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_grad_cam")


def model_snapshot(model) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def assert_unchanged(model, before: dict) -> None:
    after = model_snapshot(model)
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    assert before["training"] == after["training"] and before["requires_grad"] == after["requires_grad"]
    assert all(p.grad is None for p in model.parameters())
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks and not module._forward_pre_hooks


def _timm_vit():
    timm = pytest.importorskip("timm")
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, reg_tokens=3, num_classes=3
    )
    return model, "blocks.1.norm1", 4


def _torchvision_vit():
    models = pytest.importorskip("torchvision.models")
    model = models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=3
    )
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero
    return model, "encoder.layers.encoder_layer_1.ln_1", 1


def _transformers_vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3,
    )
    model = transformers.ViTForImageClassification(config)
    names = {name for name, _ in model.named_modules()}
    # transformers 5 names the blocks vit.layers.N, earlier versions vit.encoder.layer.N
    layer = next(n for n in ("vit.layers.1.layernorm_before", "vit.encoder.layer.1.layernorm_before") if n in names)
    return model, layer, 1


@pytest.mark.parametrize("build", [_timm_vit, _torchvision_vit, _transformers_vit], ids=["timm", "torchvision", "transformers"])
def test_gradcam_on_vit_families(build) -> None:
    """Prefix tokens are read from each family's model; the grid comes from the token count."""
    from edgeshort.spray.heatmaps import GradCAMHeatmaps, infer_num_prefix_tokens

    torch.manual_seed(0)
    model, layer, prefix = build()
    assert infer_num_prefix_tokens(model) == prefix
    model.eval()
    before = model_snapshot(model)
    maps, used = GradCAMHeatmaps(model, layer).generate(torch.randn(4, 3, 32, 32), targets=[0, 1, 2, 0])
    assert maps.shape == (4, 32, 32) and used.tolist() == [0, 1, 2, 0]
    assert (maps.reshape(4, -1).max(axis=1) > 0.5).all()
    assert_unchanged(model, before)
