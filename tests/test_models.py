"""Model creation: OpenAI weights get QuickGELU, recorded with the stage and rebuilt alike."""
from __future__ import annotations

import torch
from open_clip.transformer import QuickGELU

from pipeline import models


def _activations(model) -> set[type]:
    return {type(m.mlp.gelu) for m in model.visual.transformer.resblocks} | \
        {type(m.mlp.gelu) for m in model.transformer.resblocks}


def test_openai_weights_get_quick_gelu_recorded_and_rebuilt(tmp_path):
    # from the pretrained tag, as open_clip's own -quickgelu configs (no download: config path only)
    assert models.quick_gelu_for("ViT-B-32", "openai") is True
    assert models.quick_gelu_for("ViT-B-32", "laion2b_s34b_b79k") is False
    assert models.quick_gelu_for("ViT-B-32", None) is False
    assert models.quick_gelu_for("ViT-B-32-quickgelu", None) is True
    assert models.quick_gelu_for("ViT-B-32", "openai", quick_gelu=False) is False  # a user forces it
    cfg = models.model_config("ViT-B-32", "openai")
    assert cfg["quick_gelu"] is True and models.model_config("ViT-B-32")["quick_gelu"] is False

    torch.manual_seed(0)
    model, *_ = models.create("ViT-B-32", quick_gelu=models.quick_gelu_for("ViT-B-32", "openai"))
    assert _activations(model) == {QuickGELU}
    plain, *_ = models.create("ViT-B-32")
    assert QuickGELU not in _activations(plain)

    # a stage saved with it records it; everything that rebuilds the stage gets it back
    stage = models.save_model(model, "ViT-B-32", cfg, tmp_path / "stage0" / "model")
    assert models.model_config("", str(stage))["quick_gelu"] is True
    assert models.quick_gelu_for("ViT-B-32", str(stage)) is True
    again, *_ = models.create("", pretrained=str(stage))
    assert _activations(again) == {QuickGELU}
    loaded = models.load(stage)
    assert _activations(loaded.model) == {QuickGELU}
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded.model.encode_image(x), model.eval().encode_image(x), atol=1e-5)
    # a training checkpoint of a stage fine-tuned from those weights
    ckpt = tmp_path / "step_00000001.pt"
    torch.save({"name": "ViT-B-32", "state_dict": model.state_dict(),
                "config": {"pretrained": "openai", "quick_gelu": None}}, ckpt)
    assert _activations(models.load(ckpt).model) == {QuickGELU}
