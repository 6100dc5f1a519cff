"""Submodel specs: text form, errors, Mix'n'Match enumeration, exact parameter and FLOP counts."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from matvit import spec as specs
from matvit.model import MatViT
from matvit.registry import get_preset


@pytest.fixture
def fmnist():
    return get_preset("matvit-small-fmnist").model


def test_parse_uniform_and_mixed(fmnist):
    xl = specs.parse("XL", fmnist)
    assert xl.widths == (512,) * 6 and xl.text == "XL" and xl.id == "XL" and xl.uniform
    s = specs.parse(" s ", fmnist)
    assert s.widths == (64,) * 6
    mixed = specs.parse("S,S,M,M,L,XL", fmnist)
    assert mixed.widths == (64, 64, 128, 128, 256, 512)
    assert mixed.text == "S,S,M,M,L,XL" and mixed.id == "S-S-M-M-L-XL"
    assert specs.parse(mixed.id, fmnist) == mixed
    assert specs.parse("M,M,M,M,M,M", fmnist).text == "M"


@pytest.mark.parametrize("text, message", [
    ("XXL", "unknown granularity 'XXL' in submodel spec; allowed: S, M, L, XL"),
    ("S,M", "has 2 layers but the model has depth 6"),
    ("S,,M,M,L,XL", "empty token"),
    ("", "empty token"),
    ("S,S,M,M,L,Q", "unknown granularity 'Q'"),
])
def test_parse_errors_name_the_problem(fmnist, text, message):
    with pytest.raises(specs.SpecError, match=message):
        specs.parse(text, fmnist)


def test_monotone_enumeration_counts(fmnist):
    mono = specs.monotone(fmnist)
    assert len(mono) == math.comb(6 + 3, 3) == 84
    assert len(set(mono)) == 84
    assert all(list(s.widths) == sorted(s.widths) for s in mono)
    assert {s.text for s in specs.named(fmnist)} <= {s.text for s in mono}
    narrow = specs.narrowing(fmnist)
    assert len(set(narrow)) == 84 and all(list(s.widths) == sorted(s.widths, reverse=True) for s in narrow)
    assert {s.text for s in narrow} & {s.text for s in mono} == {s.text for s in specs.named(fmnist)}
    tiny = get_preset("matvit-tiny-digits").model
    assert len(specs.every(tiny)) == 4 ** 4


def test_one_layer_specs_change_one_layer_each_way(fmnist):
    texts = [s.text for s in specs.one_layer(fmnist)]
    assert texts[0] == "XL,S,S,S,S,S" and texts[5] == "S,S,S,S,S,XL"
    assert texts[6] == "S,XL,XL,XL,XL,XL" and texts[11] == "XL,XL,XL,XL,XL,S"
    assert len(set(texts)) == 12 and all(len(s.split(",")) == 6 for s in texts)
    assert all(sorted(s.split(",")).count("XL") in (1, 5) for s in texts)


@pytest.mark.parametrize("preset", ["matvit-tiny-digits", "matvit-small-fmnist", "matvit-small-cifar"])
@pytest.mark.parametrize("text", ["S", "XL", "monotone-mix"])
def test_params_and_flops_match_the_extracted_module(preset, text):
    cfg = get_preset(preset).model
    spec = specs.monotone(cfg)[17] if text == "monotone-mix" else specs.parse(text, cfg)
    model = MatViT(cfg)
    vit = model.extract(spec).features.vit
    assert model.num_params(spec, head=True) == sum(p.numel() for p in vit.parameters())
    for block in vit.blocks:  # the counter does not see CPU's fused attention kernel; count its matmuls
        block.attn.fused_attn = False
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        vit(torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size))
    assert model.forward_flops(spec, head=True) == counter.get_total_flops()


def test_paper_presets_are_constructible_shapes():
    model = MatViT(get_preset("matvit-b16").model)
    assert 85e6 < model.num_params("XL", head=True) < 88e6
    assert model.num_params("S", head=True) < model.num_params("XL", head=True)
