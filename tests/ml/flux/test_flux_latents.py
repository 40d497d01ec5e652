"""Flux latent scaling, 2x2 packing and position ids, checked against diffusers' FluxPipeline."""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

from app.ml.flux import latents as L


def test_scale_round_trip_and_formula():
    x = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    y = L.encode_scale(x)
    assert torch.allclose(y, (x - 0.1159) * 0.3611)
    assert torch.allclose(L.decode_scale(y), x, atol=1e-6)


@pytest.mark.parametrize("h,w", [(4, 4), (8, 6), (2, 12)])
def test_pack_matches_diffusers_and_round_trips(h, w):
    x = torch.randn(3, 16, h, w, generator=torch.Generator().manual_seed(h * 100 + w))
    ours = L.pack(x)
    theirs = FluxPipeline._pack_latents(x, 3, 16, h, w)
    assert ours.shape == (3, (h // 2) * (w // 2), 64)
    assert torch.equal(ours, theirs)
    back = L.unpack(ours, h, w)
    assert torch.equal(back, x)
    # diffusers unpacks from the pixel size
    assert torch.equal(FluxPipeline._unpack_latents(ours, h * 8, w * 8, 8), back)


def test_pack_puts_a_2x2_patch_into_one_token():
    x = torch.arange(1 * 1 * 4 * 4, dtype=torch.float32).reshape(1, 1, 4, 4)
    tok = L.pack(x)
    assert tok[0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]  # top-left patch, row-major inside
    assert tok[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]  # next patch to the right


@pytest.mark.parametrize("h,w", [(4, 4), (8, 6), (2, 12)])
def test_image_ids_match_diffusers(h, w):
    ours = L.image_ids(h, w)
    theirs = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    assert torch.equal(ours, theirs)
    assert ours[:, 0].eq(0).all()
    if h >= 4:
        assert ours[w // 2].tolist() == [0.0, 1.0, 0.0]  # first token of the second row
    assert ours[-1].tolist() == [0.0, h // 2 - 1, w // 2 - 1]


def test_text_ids_are_zero():
    assert torch.equal(L.text_ids(7), torch.zeros(7, 3))


def test_sizes_must_be_multiples_of_16_px():
    assert L.latent_size(48, 32) == (6, 4)
    assert L.image_seq_len(1024, 1024) == 4096
    assert L.image_seq_len(256, 256) == 256
    with pytest.raises(L.LatentShapeError, match=r"multiples of 16 px"):
        L.latent_size(40, 32)
    with pytest.raises(L.LatentShapeError, match="width 24"):
        L.check_pixel_size(32, 24, where="Sample 'preview'")
    with pytest.raises(L.LatentShapeError, match="Sample 'preview'"):
        L.check_pixel_size(32, 24, where="Sample 'preview'")
    with pytest.raises(L.LatentShapeError, match="even"):
        L.pack(torch.zeros(1, 16, 5, 4))
    with pytest.raises(L.LatentShapeError, match="tokens"):
        L.unpack(torch.zeros(1, 5, 64), 4, 4)
