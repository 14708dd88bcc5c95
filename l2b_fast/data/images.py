"""Image encoding and decoding of the shard encodings (16-bit PNG kept exact), and resizing; no data set specifics."""

from __future__ import annotations

import io
import zlib

import numpy as np

from l2b_fast.data.dependencies import import_data_package

try:  # Pillow is an optional dependency (extra "data"); only decoding and rgb resizing need it.
    from PIL import Image
except ModuleNotFoundError:  # pragma: no cover - exercised only without pillow
    Image = None

__all__ = [
    "CorruptSampleError",
    "decode_image",
    "decode_png",
    "encode_png",
    "png_decoder",
    "resize_nearest",
    "resize_rgb",
]


class CorruptSampleError(ValueError):
    """A sample that cannot be decoded (bad PNG bytes, missing member, wrong shape). Pipelines skip it."""


def pillow_image():
    """Pillow's ``PIL.Image`` module; :class:`~l2b_fast.data.dependencies.MissingDataDependency` naming the install
    command when Pillow is missing."""
    if Image is None:  # pragma: no cover
        import_data_package("PIL.Image")  # raises MissingDataDependency, which names the install command
    return Image


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes in the raw Taskonomy encodings: uint16 HxW -> 16-bit grey (mode I;16), uint8 HxW -> L,
    uint8 HxWx3 -> RGB (HxWx1 is squeezed). Anything else is a ValueError: silently converting e.g. int32 or
    float would change the stored values, which is exactly the bug this schema guards against.
    ``compress_level`` (0-9, zlib) only trades speed for size: 1 is ~2.5x faster and ~20% larger."""
    Image = import_data_package("PIL.Image")

    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.dtype == np.uint16 and array.ndim == 2:
        image = Image.fromarray(np.ascontiguousarray(array, dtype="<u2"))  # Pillow picks I;16 for uint16
        if image.mode != "I;16":  # very old Pillow: force the mode explicitly
            image = Image.frombytes(
                "I;16", (array.shape[1], array.shape[0]), np.ascontiguousarray(array, dtype="<u2").tobytes()
            )
    elif array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        image = Image.fromarray(np.ascontiguousarray(array))
    else:
        raise ValueError(f"encode_png: expected uint16 HxW, uint8 HxW or uint8 HxWx3, got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def _png_header(data: bytes) -> tuple[int, int] | None:
    """(bit depth, colour type) from the IHDR chunk, or None if ``data`` does not start like a PNG."""
    if len(data) < 33 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return data[24], data[25]


def _check_png_chunks(data: bytes) -> None:
    """ValueError unless every chunk is complete and its CRC matches, up to IEND.

    pyspng tells libspng to ignore CRCs (and zlib's checksum), so a flipped byte in image data would decode to
    silently wrong pixels; checking the CRCs here costs ~1% of the decode (zlib.crc32 runs at GB/s).
    """
    position, end = 8, len(data)
    while position + 12 <= end:
        length = int.from_bytes(data[position : position + 4], "big")
        stop = position + 8 + length
        if stop + 4 > end:
            break
        if zlib.crc32(data[position + 4 : stop]) != int.from_bytes(data[stop : stop + 4], "big"):
            raise CorruptSampleError(
                f"decode_png: cannot decode: CRC mismatch in chunk {data[position + 4 : position + 8]!r}"
            )
        if data[position + 4 : position + 8] == b"IEND":
            return
        position = stop + 4
    raise CorruptSampleError("decode_png: cannot decode: truncated PNG (no complete IEND chunk)")


try:  # libspng: ~1.3x faster than Pillow on 8-bit RGB, the largest member (extra "data")
    import pyspng as _pyspng
except ImportError:  # pragma: no cover - exercised in the Pillow-only test subprocess
    _pyspng = None

# (bit depth, colour type) that libspng decodes to exactly what Pillow gives: grey 8, RGB 8, grey 16 (the
# three encodings encode_png writes). Anything else (palette, alpha, 16-bit RGB) goes through Pillow.
_SPNG_KINDS = {(8, 0), (8, 2), (16, 0)}


def png_decoder() -> str:
    """Name of the PNG decoder :func:`decode_png` uses for the shard encodings: "pyspng" or "pillow"."""
    return "pyspng" if _pyspng is not None else "pillow"


def decode_png(data: bytes, decoder: str | None = None, *, name: str | None = None) -> np.ndarray:
    """PNG bytes -> numpy array with the stored values (16-bit grey stays uint16; never 8-bit conversion).

    ``decoder``: "pyspng", "pillow" or None (the fastest installed, :func:`png_decoder`); both give identical
    arrays (tested). Widen uint16 to int32 before arithmetic (torch has no uint16 arithmetic). Never use
    webdataset's image decoders (they convert 16-bit to 8-bit). :class:`CorruptSampleError` (a ValueError) for
    undecodable bytes, naming the member ``name`` when given.
    """
    decoder = decoder or png_decoder()
    if decoder not in ("pyspng", "pillow"):
        raise ValueError(f"decode_png: unknown decoder {decoder!r} (pyspng, pillow)")
    if decoder == "pyspng" and _pyspng is None:
        raise ValueError("decode_png: pyspng is not installed (pip install pyspng)")
    if name is None:
        return _decode_png(data, decoder)
    try:
        return _decode_png(data, decoder)
    except CorruptSampleError as error:
        raise CorruptSampleError(f"cannot decode {name}: {error}") from error


def _decode_png(data: bytes, decoder: str) -> np.ndarray:
    header = _png_header(data)
    if decoder == "pyspng" and header in _SPNG_KINDS:
        _check_png_chunks(data)
        try:
            array = _pyspng.load(data)
        except Exception as error:
            raise CorruptSampleError(f"decode_png: cannot decode: {type(error).__name__}: {error}") from error
        if header == (16, 0):
            array = np.ascontiguousarray(array[..., 0])  # libspng returns 16-bit grey as grey+alpha
        return array
    return _decode_png_pillow(data)


def _decode_png_pillow(data: bytes) -> np.ndarray:
    Image = import_data_package("PIL.Image")

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            array = np.array(image)  # a writable copy
    except Exception as error:
        raise CorruptSampleError(f"decode_png: cannot decode: {type(error).__name__}: {error}") from error
    if array.dtype == np.int32 and array.size and array.min() >= 0 and array.max() <= 65535:
        array = array.astype(np.uint16)  # some Pillow versions return mode "I" for 16-bit grey
    elif array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))  # mode I;16B
    return array


# ------------------------------------------------------------------------------------------------ writing
def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Decode any 8-bit image (JPEG or PNG) to uint8 RGB [H, W, 3] (CelebA)."""
    pillow_image()
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception as exn:
        raise CorruptSampleError(f"cannot decode {name}: {type(exn).__name__}: {exn}") from exn
    return array


def nearest_index(src: int, dst: int) -> np.ndarray:
    """cv2.INTER_NEAREST source indices: floor(i * src / dst); an integer factor k gives a[::k]."""
    return np.minimum((np.arange(dst, dtype=np.int64) * src) // dst, src - 1)


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of [H, W] or [H, W, C] with cv2's convention (512 -> 256 is ``a[::2, ::2]``)."""
    h, w = array.shape[:2]
    if (h, w) == (height, width):
        return array
    if h % height == 0 and w % width == 0:
        return np.ascontiguousarray(array[:: h // height, :: w // width])
    return array[nearest_index(h, height)[:, None], nearest_index(w, width)[None, :]]


def resize_rgb(rgb: np.ndarray, height: int, width: int, method: str = "bilinear") -> np.ndarray:
    """Resize uint8 RGB [H, W, 3]: "nearest" (cv2 convention), "bilinear" or "area" (Pillow, uint8 out)."""
    h, w = rgb.shape[:2]
    if (h, w) == (height, width):
        return rgb
    if method == "nearest":
        return resize_nearest(rgb, height, width)
    pillow_image()
    resample = {"bilinear": Image.BILINEAR, "area": Image.BOX}.get(method)
    if resample is None:
        raise ValueError(f"unknown rgb resize method {method!r} (nearest, bilinear, area)")
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height), resample))
