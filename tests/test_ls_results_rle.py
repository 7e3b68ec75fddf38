"""backend.ls_results.mask_to_rle: the brush RLE bytes label-studio-sdk's ``brush.mask2rle`` makes for the
same mask as 0/255, for any shape and content: single pixels, stripes, noise, runs longer than one token
holds (2**16 bytes), both ways the bits end (on a byte boundary or not); and it decodes back with the SDK's
decoder."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from label_studio_sdk.converter import brush

from backend.ls_results import mask_to_rle


def sdk_rle(mask: np.ndarray) -> list[int]:
    return brush.mask2rle(np.ascontiguousarray(mask, dtype=np.uint8) * 255)


def sdk_bit_count(mask: np.ndarray) -> int:
    """Bits before the padding, by the SDK's own run splitting (each pixel is 4 equal bytes)."""
    lengths, _, _ = brush.base_rle_encode(np.repeat(np.ascontiguousarray(mask, dtype=np.uint8).ravel() * 255, 4))
    bits = 53
    for length in lengths.tolist():
        while length > 2**16:
            bits, length = bits + 27, length - 2**16
        bits += 14 if length <= 8 else 15 if length <= 16 else 19 if length <= 256 else 27
    return bits


@given(arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))))
@settings(max_examples=300, deadline=None)
def test_equals_the_sdk_on_any_mask(mask):
    assert mask_to_rle(mask) == sdk_rle(mask)


@given(st.booleans(), st.lists(st.sampled_from([1, 2, 3, 4, 5, 63, 64, 65, 2**14 - 1, 2**14, 2**14 + 1, 2**15 + 3,
                                                 40000]), min_size=1, max_size=6))
@settings(max_examples=200, deadline=None)
def test_equals_the_sdk_on_runs_around_every_field_size(first, runs):
    """Runs of 4-20 bytes (3-, 4- and 8-bit fields), 252-260 (8 / 16) and around 2**16 bytes (one token or
    several; a long run's rest keeps the 16-bit field)."""
    mask = np.concatenate([np.full(length, (first + index) % 2 == 1) for index, length in enumerate(runs)])[None]
    assert mask_to_rle(mask) == sdk_rle(mask)


def test_equals_the_sdk_on_masks_of_every_kind():
    rng = np.random.default_rng(0)
    height, width = 300, 400
    yy, xx = np.ogrid[:height, :width]
    disc = (yy - 150) ** 2 + (xx - 200) ** 2 < 120**2
    cases = {
        "empty": np.zeros((height, width), bool), "full": np.ones((height, width), bool),  # 480,000-byte runs
        "disc": disc, "noisy disc": disc ^ (rng.random((height, width)) > 0.99),
        "stripes": (xx % 3 == 0) & np.ones((height, 1), bool), "one pixel": np.eye(1, dtype=bool),
        "diagonal": np.eye(257, dtype=bool), "run of 2**14 pixels": np.arange(40000).reshape(200, 200) >= 2**14,
        "run of 2**14 + 1 pixels": np.arange(40000).reshape(200, 200) > 2**14,
    }
    ends_on_a_byte = 0
    for name, mask in cases.items():
        assert mask_to_rle(mask) == sdk_rle(mask), name
        ends_on_a_byte += sdk_bit_count(mask) % 8 == 0
    sizes = [(h, w) for h in range(1, 13) for w in range(1, 13)]
    for h, w in sizes:
        mask = rng.random((h, w)) > 0.5
        assert mask_to_rle(mask) == sdk_rle(mask), (h, w)
        ends_on_a_byte += sdk_bit_count(mask) % 8 == 0
    assert ends_on_a_byte > 0  # the SDK's whole padding byte was exercised


def test_decodes_back_to_the_mask_with_the_sdk():
    rng = np.random.default_rng(1)
    mask = rng.random((37, 91)) > 0.7
    rgba = brush.decode_rle(mask_to_rle(mask)).reshape(37, 91, 4)
    np.testing.assert_array_equal(rgba[..., 3] > 0, mask)


def test_any_truthy_mask_is_read_as_bool():
    mask = np.zeros((4, 5), dtype=np.uint8)
    mask[1:3, 2:4] = 255
    assert mask_to_rle(mask) == mask_to_rle(mask > 0) == sdk_rle(mask > 0)


def test_an_empty_array_is_refused():
    with pytest.raises(ValueError, match="empty mask"):
        mask_to_rle(np.zeros((0, 5), bool))
