"""The data pipeline's fast paths held to their plain references on fresh random samples.

- ``augment`` (one gather per map through composed scale/flip/crop indices, rgb resized from a source box)
  against ``augment_reference`` (resize whole maps, flip, pad, crop);
- ``TaskonomyProtocol.to_targets`` (lookup tables) against the formulas ``target_values`` / ``rgb_values``;
- ``TaskonomyProtocol.to_targets_batch`` (torch, batched, any device) against ``to_targets``;
- ``decode_png`` with libspng against Pillow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l2b_fast.data import images, shards
from l2b_fast.datasets.taskonomy import protocol as T


def random_raw(rng: np.random.Generator, h: int, w: int, with_valid: bool = False) -> dict[str, np.ndarray]:
    normal = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    normal[rng.random((h, w)) < 0.2] = 128  # invalid normals, which a flip must leave invalid
    raw = {
        "rgb": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "segment_semantic": rng.integers(0, 18, (h, w), dtype=np.uint8),
        "normal": normal,
        "depth_zbuffer": rng.integers(0, 65536, (h, w), dtype=np.uint16),
        "keypoints2d": rng.integers(0, 65536, (h, w), dtype=np.uint16),
        "edge_texture": rng.integers(0, 65536, (h, w), dtype=np.uint16),
    }
    if with_valid:  # a sample that an earlier step already padded
        raw[T.VALID_KEY] = rng.random((h, w)) < 0.9
    return raw


CASES = [
    # (h, w, scale, crop, flip)
    (32, 32, (0.5, 1.5), 32, True),
    (17, 23, (0.5, 1.5), 16, 1.0),  # odd sizes, always flipped
    (31, 9, (0.9, 1.1), (7, 5), 0.5),  # non-square crop
    (20, 20, (1.0, 1.0), 24, 1.0),  # no rescale, crop larger than the image: padding on both sides
    (24, 16, (0.3, 0.6), 20, True),  # always smaller than the crop
    (25, 25, None, None, 1.0),  # flip only
    (25, 25, (1.7, 2.1), None, False),  # upscale only, no crop
    (64, 48, (0.5, 1.5), 40, True),
]


@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("h,w,scale,crop,flip", CASES)
def test_augment_matches_reference(h, w, scale, crop, flip, with_valid):
    data = np.random.default_rng([h, w, int(with_valid)])
    rgb_differences = []
    for trial in range(12):
        raw = random_raw(data, h, w, with_valid)
        fast = T.augment(raw, np.random.default_rng(trial), scale=scale, crop=crop, flip=flip)
        reference = T.augment_reference(raw, np.random.default_rng(trial), scale=scale, crop=crop, flip=flip)
        assert fast.keys() == reference.keys()
        for key in reference:
            assert fast[key].shape == reference[key].shape and fast[key].dtype == reference[key].dtype, key
            assert fast[key].flags.c_contiguous and fast[key].flags.writeable, key
            if key == "rgb":
                rgb_differences.append((fast[key].astype(np.int32) - reference[key]).ravel())
            else:
                np.testing.assert_array_equal(fast[key], reference[key], err_msg=key)
    # Pillow's fixed-point weights depend on the sampling origin: a level or two on some pixels (up to a
    # quarter of them when upscaling noise like this), without bias.
    difference = np.concatenate(rgb_differences)
    assert np.abs(difference).max() <= 2 and abs(difference.mean()) < 0.03 and (difference != 0).mean() < 0.35


def test_augment_same_draws_as_reference():
    """Both consume the generator identically, so a pipeline's later draws do not depend on the version."""
    raw = random_raw(np.random.default_rng(0), 16, 16)
    first, second = np.random.default_rng(5), np.random.default_rng(5)
    T.augment(raw, first, scale=(0.5, 1.5), crop=12)
    T.augment_reference(raw, second, scale=(0.5, 1.5), crop=12)
    assert first.random() == second.random()


PROTOCOLS = [
    {},
    {
        "rgb_normalization": "caffe_bgr",
        "mask_invalid_normals": True,
        "segmentation_mask": "ignore_uncertain_background",
    },
    {"keypoints_clip": 0.01, "edge_clip": 0.5, "depth_valid_below": 1000, "tasks": ("normal", "edge_texture")},
]


@pytest.mark.parametrize("settings", PROTOCOLS)
def test_to_targets_tables_match_formulas(settings):
    protocol = T.TaskonomyProtocol(**settings)
    rng = np.random.default_rng(1)
    raw = T.augment(random_raw(rng, 19, 13), rng, scale=(0.6, 0.9), crop=15)  # with padded pixels
    raw["depth_zbuffer"].flat[:3] = (0, 64500, 65535)
    valid = raw[T.VALID_KEY]
    assert not valid.all()
    rgb, targets, masks = protocol.to_targets(raw)
    expected_rgb = np.moveaxis(protocol.rgb_values(raw["rgb"]), 2, 0) * valid
    np.testing.assert_array_equal(rgb.numpy(), expected_rgb)
    assert sorted(targets) == sorted(protocol.tasks)
    for task in protocol.tasks:
        expected = protocol.target_values(task, raw[task])
        expected = (
            np.moveaxis(expected, 2, 0)
            if task == "normal"
            else expected
            if task == "segment_semantic"
            else expected[None]
        )
        if task == "segment_semantic":
            expected = np.where(valid, expected, 255)
        np.testing.assert_array_equal(targets[task].numpy(), expected, err_msg=task)
        np.testing.assert_array_equal(masks[task].numpy(), protocol.target_mask(task, raw[task]) & valid, err_msg=task)


def test_to_targets_rejects_wrong_raw_dtype():
    raw = random_raw(np.random.default_rng(2), 4, 4)
    raw["depth_zbuffer"] = raw["depth_zbuffer"].astype(np.int32)
    with pytest.raises(T.CorruptSampleError, match="depth_zbuffer must be uint16"):
        T.TaskonomyProtocol().to_targets(raw)


ENCODINGS = {
    "grey16": lambda rng: rng.integers(0, 65536, (21, 17), dtype=np.uint16),
    "grey8": lambda rng: rng.integers(0, 256, (21, 17), dtype=np.uint8),
    "rgb8": lambda rng: rng.integers(0, 256, (21, 17, 3), dtype=np.uint8),
}


@pytest.mark.skipif(images._pyspng is None, reason="pyspng not installed")
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_pyspng_and_pillow_decode_identically(encoding):
    array = ENCODINGS[encoding](np.random.default_rng(3))
    array.flat[0] = np.iinfo(array.dtype).max  # the 65535 / 255 extreme
    data = shards.encode_png(array)
    fast, plain = shards.decode_png(data, "pyspng"), shards.decode_png(data, "pillow")
    for decoded in (fast, plain):
        assert decoded.dtype == array.dtype and decoded.flags.c_contiguous and decoded.flags.writeable
        np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("decoder", ["pyspng", "pillow"])
def test_decoders_reject_corrupt_png(decoder):
    if decoder == "pyspng" and images._pyspng is None:
        pytest.skip("pyspng not installed")
    data = bytearray(shards.encode_png(np.random.default_rng(4).integers(0, 65536, (32, 32), dtype=np.uint16)))
    data[60:80] = bytes(20)  # inside the image data: the CRC no longer matches
    with pytest.raises(ValueError, match="cannot decode"):
        shards.decode_png(bytes(data), decoder)
    with pytest.raises(ValueError, match="cannot decode"):
        shards.decode_png(bytes(data[:50]), decoder)


def test_decode_png_without_pyspng_uses_pillow(monkeypatch):
    monkeypatch.setattr(images, "_pyspng", None)
    assert shards.png_decoder() == "pillow"
    array = ENCODINGS["grey16"](np.random.default_rng(5))
    np.testing.assert_array_equal(shards.decode_png(shards.encode_png(array)), array)
    with pytest.raises(ValueError, match="pyspng is not installed"):
        shards.decode_png(shards.encode_png(array), "pyspng")


@pytest.mark.parametrize("settings", PROTOCOLS)
def test_to_targets_batch_matches_to_targets(settings):
    """Normalising a raw batch with torch (on the GPU in training) gives exactly the per-sample numpy values."""
    protocol = T.TaskonomyProtocol(**settings)
    rng = np.random.default_rng(6)
    samples = [T.augment(random_raw(rng, 15, 15), rng, scale=(0.6, 1.2), crop=13) for _ in range(3)]
    samples.append({key: value for key, value in random_raw(rng, 13, 13).items()})  # no VALID_KEY: all valid
    for sample in samples:  # int16 bit patterns must widen back to these
        sample["depth_zbuffer"].flat[:4] = (0, 64499, 64500, 65535)
        sample["edge_texture"].flat[:2] = (32768, 65535)
    raw = {
        key: torch.stack([protocol.raw_tensors(sample)[key] for sample in samples])
        for key in protocol.raw_tensors(samples[0])
    }
    assert raw["edge_texture"].dtype == torch.int16 and raw["rgb"].dtype == torch.uint8
    rgb, targets, masks = protocol.to_targets_batch(raw, "cpu")
    expected = [protocol.to_targets(sample) for sample in samples]
    torch.testing.assert_close(rgb, torch.stack([e[0] for e in expected]), rtol=0, atol=0)
    for task in protocol.tasks:
        torch.testing.assert_close(targets[task], torch.stack([e[1][task] for e in expected]), rtol=0, atol=0)
        torch.testing.assert_close(masks[task], torch.stack([e[2][task] for e in expected]), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_targets_batch_on_cuda_matches_cpu():
    protocol = T.TaskonomyProtocol()
    rng = np.random.default_rng(7)
    samples = [protocol.raw_tensors(T.augment(random_raw(rng, 33, 33), rng, crop=31)) for _ in range(4)]
    raw = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
    on_cpu, on_gpu = (
        protocol.to_targets_batch(raw, "cpu"),
        protocol.to_targets_batch({k: v.pin_memory() for k, v in raw.items()}, "cuda"),
    )
    torch.testing.assert_close(on_gpu[0].cpu(), on_cpu[0], rtol=0, atol=0)
    for task in protocol.tasks:
        torch.testing.assert_close(on_gpu[1][task].cpu(), on_cpu[1][task], rtol=0, atol=0)
        torch.testing.assert_close(on_gpu[2][task].cpu(), on_cpu[2][task], rtol=0, atol=0)
