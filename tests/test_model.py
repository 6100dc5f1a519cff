"""The nested model: slicing equals masking, and XL is exactly a plain timm ViT."""

import torch
from timm.models.vision_transformer import VisionTransformer

from matvit import spec as specs
from matvit.config import get_preset
from matvit.model import MatViT


def masked_forward(model: MatViT, x: torch.Tensor, spec) -> torch.Tensor:
    """Test oracle: every block at full width, hidden neurons past the spec's width zeroed."""
    def hook(width):
        def fn(module, args, output):
            output = output.clone()
            output[..., width:] = 0
            return output
        return fn
    handles = [b.mlp.act.register_forward_hook(hook(w)) for b, w in zip(model.blocks, spec.widths, strict=True)]
    try:
        return model(x, None)
    finally:
        for h in handles:
            h.remove()


def _model() -> MatViT:
    torch.manual_seed(0)
    return MatViT(get_preset("matvit-tiny-digits").model).eval()


def test_sliced_equals_masked_for_every_granularity_and_a_mix():
    model = _model()
    x = torch.randn(5, 1, 8, 8)
    for spec in specs.named(model.config) + [specs.parse("S,L,M,XL", model.config)]:
        torch.testing.assert_close(model(x, spec), masked_forward(model, x, spec), rtol=0, atol=1e-5)


def test_smaller_granularities_give_different_outputs():
    model = _model()
    x = torch.randn(3, 1, 8, 8)
    assert not torch.allclose(model(x, "S"), model(x, "XL"))


def test_xl_equals_plain_timm_vit_with_same_weights():
    model = _model()
    plain = VisionTransformer(**model.config.timm_kwargs()).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(model(x, "XL"), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_embed_is_normalised_prelogits_cls_feature():
    model = _model()
    x = torch.randn(4, 1, 8, 8)
    emb = model.embed(x, "M")
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    with model.submodel("M"):
        cls = model.forward_features(x)[:, 0]
    torch.testing.assert_close(emb, torch.nn.functional.normalize(cls, dim=-1))


def test_submodel_context_restores_full_width():
    model = _model()
    with model.submodel("S"):
        assert all(b.mlp.width == 16 for b in model.blocks)
    assert all(b.mlp.width is None for b in model.blocks)
