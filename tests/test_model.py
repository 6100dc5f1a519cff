"""The nested model: slicing equals masking, and XL is exactly a plain timm ViT."""

import torch
from timm.models.vision_transformer import VisionTransformer

from matvit import spec as specs
from matvit.config import MatViTConfig, get_preset
from matvit.extract import extract
from matvit.model import COSINE_SCALE, MatViT, NestedMlp


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


def test_forward_without_spec_runs_the_enclosing_submodel():
    model = _model()
    x = torch.randn(3, 1, 8, 8)
    with model.submodel("S"):
        inside = model(x)
        inside_embed = model.features_and_logits(x)[0]
    torch.testing.assert_close(inside, model(x, "S"), rtol=0, atol=0)
    torch.testing.assert_close(inside_embed, model.features_and_logits(x, "S")[0], rtol=0, atol=0)
    assert all(b.mlp.width is None for b in model.blocks)
    torch.testing.assert_close(model(x), model(x, "XL"), rtol=0, atol=0)


def test_nested_submodel_contexts_restore_the_outer_widths():
    model = _model()
    x = torch.randn(3, 1, 8, 8)
    mix = specs.parse("S,M,L,XL", model.config)
    with model.submodel(mix):
        with model.submodel("M"):
            assert [b.mlp.width for b in model.blocks] == [32] * 4
            torch.testing.assert_close(model(x), model(x, "M"), rtol=0, atol=0)
        assert [b.mlp.width for b in model.blocks] == list(mix.widths)
        torch.testing.assert_close(model(x, "S"), model(x, specs.uniform("S", model.config)), rtol=0, atol=0)
        assert [b.mlp.width for b in model.blocks] == list(mix.widths)
        after_inner = model(x)
    torch.testing.assert_close(after_inner, model(x, mix), rtol=0, atol=0)
    assert all(b.mlp.width is None for b in model.blocks)


def test_ffn_width_is_exact_when_mlp_hidden_is_not_a_multiple_of_embed_dim():
    config = MatViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=44, depth=2, num_heads=4,
                          mlp_hidden=120)
    assert int(config.embed_dim * (config.mlp_hidden / config.embed_dim)) != config.mlp_hidden  # timm's rounding
    torch.manual_seed(0)
    model = MatViT(config).eval()
    assert isinstance(model, VisionTransformer)
    assert all(isinstance(b.mlp, NestedMlp) and b.mlp.fc1.out_features == 120 for b in model.blocks)
    assert all(b.mlp.fc2.in_features == 120 for b in model.blocks)
    assert config.granularities == {"S": 15, "M": 30, "L": 60, "XL": 120}
    x = torch.randn(2, 1, 8, 8)
    for text in ("XL", "S,L"):
        standalone = extract(model, text)
        assert [b.mlp.fc1.out_features for b in standalone.blocks] == list(model.spec(text).widths)
        with torch.no_grad():
            torch.testing.assert_close(standalone(x), model(x, text))


def test_cosine_head_scores_the_embedding_by_its_cosine_to_each_class_weight():
    torch.manual_seed(0)
    config = get_preset("matvit-tiny-digits").model
    config.head = "cosine"
    model = MatViT(config).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        logits = model(x, "S")
        weights = torch.nn.functional.normalize(model.head.weight, dim=-1)
        torch.testing.assert_close(logits, COSINE_SCALE * model.embed(x, "S") @ weights.T, rtol=1e-5, atol=1e-5)
    assert logits.abs().max() <= COSINE_SCALE + 1e-4
    assert MatViTConfig.from_dict(config.to_dict()).head == "cosine"
    old = {k: v for k, v in config.to_dict().items() if k != "head"}  # a config saved before heads existed
    assert MatViTConfig.from_dict(old).head == "linear"
