"""OneTrainer's bucket rule, resolution parsing, nearest-aspect assignment, cover + crop."""
import math

import numpy as np
import pytest

from app.ml.data.bucketing import (
    BucketSettings,
    assign_bucket,
    bucket_sizes,
    cover_size,
    crop_box,
    nearest_bucket,
    parse_resolution,
    quantization_for,
    shrink_to_fit,
)


def with_transposes(pairs):
    return {p for a, b in pairs for p in ((a, b), (b, a))}


def test_sdxl_1024_q64_matches_onetrainer_list():
    expected = with_transposes([(1024, 1024), (896, 1152), (832, 1280), (768, 1344), (704, 1472),
                                (640, 1600), (576, 1792), (576, 1920), (512, 2048)])
    got = bucket_sizes(1024, quantization_for("sdxl"))
    assert set(got) == expected and len(got) == len(expected) == 17
    # 1:1.25 (h:w) is the landscape 1152 wide, 896 high: sizes are (width, height)
    assert (1152, 896) in got


def test_sd15_512_q8():
    expected = with_transposes([(512, 512), (456, 576), (416, 624), (384, 680), (360, 728),
                                (320, 808), (296, 888), (272, 960), (256, 1024)])
    got = bucket_sizes(512, quantization_for("sd15"))
    assert set(got) == expected
    assert quantization_for("SD1.5") == 8 and quantization_for("sd2") == 8 and quantization_for("flux") == 64


def test_sdxl_512_and_sd15_1024_follow_rule():
    assert set(bucket_sizes(512, 64)) == with_transposes(
        [(512, 512), (448, 576), (448, 640), (384, 704), (320, 832), (320, 896), (256, 960), (256, 1024)])
    assert set(bucket_sizes(1024, 8)) == with_transposes(
        [(1024, 1024), (912, 1144), (840, 1256), (776, 1352), (728, 1448), (648, 1616), (592, 1776),
         (544, 1912), (512, 2048)])


@pytest.mark.parametrize("r,q", [(512, 8), (768, 8), (1024, 64), (512, 64)])
def test_rule_properties(r, q):
    for w, h in bucket_sizes(r, q):
        assert w % q == 0 and h % q == 0
        assert abs(w * h / r**2 - 1) < 0.15  # about the same pixel count as R*R


def test_parse_resolution():
    assert parse_resolution("512").targets == (512,)
    assert parse_resolution(" 512, 768,1024 ").targets == (512, 768, 1024)
    fixed = parse_resolution("1024x768")
    assert fixed.fixed == (1024, 768)  # width 1024, height 768
    for bad in ["", "abc", "512x", "0", "1024x768x2"]:
        with pytest.raises(ValueError, match="not understood"):
            parse_resolution(bad)


def test_nearest_aspect_in_log_space():
    buckets = bucket_sizes(1024, 64)
    assert nearest_bucket((1000, 1000), buckets) == (1024, 1024)
    assert nearest_bucket((3000, 2000), buckets) == (1280, 832)  # 3:2 landscape
    assert nearest_bucket((2000, 3000), buckets) == (832, 1280)
    assert nearest_bucket((100, 1000), buckets) == (512, 2048)  # beyond 1:4 clamps to 1:4
    # symmetric in log space: ratio r and 1/r land on transposed buckets
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = rng.integers(100, 4000, size=2)
        a, b = nearest_bucket((w, h), buckets)
        assert nearest_bucket((h, w), buckets) == (b, a)
        # no other bucket is nearer in log-aspect
        d = abs(math.log(a / b) - math.log(w / h))
        assert all(d <= abs(math.log(x / y) - math.log(w / h)) + 1e-12 for x, y in buckets)


def test_cover_and_crop():
    assert cover_size((1000, 500), (512, 512)) == (1024, 512)
    resized = cover_size((600, 1000), (456, 576))
    assert resized[0] >= 456 and resized[1] >= 576 and (resized[0] == 456 or resized[1] == 576)
    assert crop_box((1024, 512), (512, 512)) == (256, 0, 768, 512)
    lefts = {crop_box((1024, 512), (512, 512), np.random.default_rng(s))[0] for s in range(20)}
    assert len(lefts) > 5 and all(0 <= x <= 512 for x in lefts)


def test_no_upscale_gives_smaller_quantized_bucket():
    s = BucketSettings("1024", model_family="sdxl", no_upscale=True)
    res = parse_resolution(s.resolution)
    b = assign_bucket((700, 460), res, 1024, s)
    assert b[0] <= 700 and b[1] <= 460 and b[0] % 64 == 0 and b[1] % 64 == 0
    assert b == (640, 448)  # 1280x832 scaled by 700/1280, each side floored to 64
    assert assign_bucket((2000, 1300), res, 1024, s) == (1280, 832)  # large images unchanged
    assert shrink_to_fit((512, 512), (20, 20), 8) == (16, 16)
    assert assign_bucket((700, 460), res, 1024, BucketSettings("1024", model_family="sdxl")) == (1280, 832)


def test_bucketing_off_and_fixed_size():
    off = BucketSettings("512", quantization=8, mode="off")
    assert assign_bucket((1000, 300), parse_resolution("512"), 512, off) == (512, 512)
    fixed = BucketSettings("1024x768", quantization=64)
    assert assign_bucket((500, 900), parse_resolution("1024x768"), None, fixed) == (1024, 768)


def test_settings_need_quantization():
    with pytest.raises(ValueError, match="quantization"):
        BucketSettings("512")
    with pytest.raises(ValueError, match="unknown model family"):
        BucketSettings("512", model_family="dalle")
    assert BucketSettings("512", model_family="sdxl").q == 64
    assert BucketSettings("512", model_family="sdxl", quantization=16).q == 16
