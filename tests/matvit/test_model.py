"""The nested model: slicing equals masking, and XL is exactly a plain timm ViT."""

import threading

import torch
from timm.models.vision_transformer import VisionTransformer

from matvit import spec as specs
from matvit.model import MatViT, MatViTConfig, NestedMlp
from matvit.nested import COSINE_SCALE
from matvit.registry import get_preset


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
        return model(x, "XL")
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
    cls = model.forward_features(x, "M")[:, 0]
    torch.testing.assert_close(emb, torch.nn.functional.normalize(cls, dim=-1))


def test_the_widths_are_an_argument_of_the_forward_and_leave_no_state():
    model = _model()
    x = torch.randn(3, 1, 8, 8)
    want = {text: model(x, text) for text in ("S", "M", "S,M,L,XL", "XL")}
    torch.testing.assert_close(model(x), want["XL"], rtol=0, atol=0)
    torch.testing.assert_close(model(x, specs.parse("S,M,L,XL", model.config)), want["S,M,L,XL"], rtol=0, atol=0)
    got: dict[str, list[torch.Tensor]] = {text: [] for text in want}

    def run(text: str) -> None:
        with torch.no_grad():
            for _ in range(20):
                got[text].append(model(x, text))
    threads = [threading.Thread(target=run, args=(text,)) for text in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for text, outs in got.items():  # threads with different specs at once, each gets its own submodel's output
        for out in outs:
            torch.testing.assert_close(out, want[text], rtol=1e-5, atol=1e-5)


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
        standalone = model.extract(text).features.vit
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


def test_the_nested_share_is_the_ffns_share_of_the_flops():
    model = MatViT(get_preset("matvit-ti16").model)
    c = model.config
    tokens = (c.img_size // c.patch_size) ** 2 + 1
    ffns = sum(2 * 2 * tokens * c.embed_dim * w for w in model.spec("XL").widths)
    assert abs(model.nested_share() - ffns / model.forward_flops("XL")) < 1e-9


def test_plain_is_an_untrained_timm_vit_of_the_widths():
    model = MatViT(get_preset("matvit-tiny-digits").model)
    plain = model.plain("S,M,L,XL")
    vit = plain.features.vit
    assert type(vit) is VisionTransformer
    assert [b.mlp.fc1.out_features for b in vit.blocks] == list(model.spec("S,M,L,XL").widths)
    assert plain(torch.zeros(2, 1, 8, 8)).shape == (2, model.embedding_dim)
