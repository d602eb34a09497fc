"""Every image form a web crawl delivers reaches the model as an image viewer shows it (on a white page), or
is skipped under a named reason. Each file is generated here; the expected RGB is written out per case."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from jestclip.data.decode import open_image, to_rgb

WHITE = 255.0


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def shown(data: bytes) -> np.ndarray:
    """What the loader hands the transform: ``[H, W, 3]`` uint8 RGB."""
    image = open_image(data)
    assert isinstance(image, Image.Image) and image.mode == "RGB", image
    return np.asarray(image)


def png(width: int, height: int, depth: int, colour: int, rows: np.ndarray, extra: bytes = b"") -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit colour): ``rows`` ``[H, W * channels]`` big-endian."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + extra
        + chunk(b"IDAT", zlib.compress(raw))
        + (chunk(b"IEND", b""))
    )


def eight_bit(v: np.ndarray) -> np.ndarray:
    """A 16-bit sample as an 8-bit display shows it: v * 255 / 65535."""
    return v.astype(np.float64) * 255 / 65535


def test_a_16_bit_gray_png_is_shown_at_its_brightness_not_white():
    # The case: PIL's own convert("RGB") clipped I;16 at 255 (mean 0.998 instead of 0.500).
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    got = shown(data)
    assert np.abs(got - eight_bit(ramp)[..., None]).max() <= 0.5 + 1e-9
    assert abs(got.mean() / 255 - 0.5) < 0.002


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_every_16_bit_gray_layout_is_scaled_to_8_bits(mode):
    values = np.array([[0, 257, 32768, 65535]])
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    image = Image.frombytes(mode, (4, 1), values.astype(dtype).tobytes())
    got = np.asarray(to_rgb(image))
    assert got[0, :, 0].tolist() == [0, 1, 128, 255] and (got == got[..., :1]).all()


def test_a_16_bit_rgb_png_keeps_its_colours():
    rgb = np.array([[[65535, 0, 32896], [4112, 60000, 0]]], dtype=">u2")  # 1 x 2 pixels
    got = shown(png(2, 1, 16, 2, rgb.reshape(1, 6)))
    assert np.abs(got - eight_bit(rgb.astype(np.int64))).max() <= 1


def test_bilevel_gray_and_palette_images_expand_to_rgb():
    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    assert shown(encode(bits, "PNG")).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    assert shown(encode(Image.new("L", (1, 1), 77), "PNG")).tolist() == [[[77, 77, 77]]]
    palette = Image.new("P", (2, 1), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30])
    assert shown(encode(palette, "PNG")).tolist() == [[[10, 200, 30]] * 2]


def over_white(colour: np.ndarray, alpha: float) -> np.ndarray:
    """A colour with opacity alpha (0..1) drawn on a white page."""
    return alpha * colour + (1 - alpha) * WHITE


@pytest.mark.parametrize("alpha", [0, 64, 128, 255])
def test_transparency_is_shown_over_white(alpha):
    colour = np.array([200.0, 10.0, 60.0])
    rgba = shown(encode(Image.new("RGBA", (2, 2), (200, 10, 60, alpha)), "PNG"))
    assert np.abs(rgba - over_white(colour, alpha / 255)).max() <= 1
    la = shown(encode(Image.new("LA", (2, 2), (90, alpha)), "PNG"))
    assert np.abs(la - over_white(np.full(3, 90.0), alpha / 255)).max() <= 1
    webp = shown(encode(Image.new("RGBA", (2, 2), (200, 10, 60, alpha)), "WEBP", lossless=True))
    assert np.abs(webp - over_white(colour, alpha / 255)).max() <= 1


def test_a_transparent_palette_entry_or_colour_key_is_white():
    palette = Image.new("P", (2, 1), 0)
    palette.putpixel((1, 0), 1)
    palette.putpalette([0, 0, 0, 250, 0, 0])  # index 0 is black but transparent
    expected = [[[255, 255, 255], [250, 0, 0]]]
    assert shown(encode(palette, "PNG", transparency=0)).tolist() == expected
    assert shown(encode(palette, "GIF", transparency=0)).tolist() == expected
    key = Image.new("RGB", (2, 1), (0, 0, 0))
    key.putpixel((1, 0), (250, 0, 0))
    assert shown(encode(key, "PNG", transparency=(0, 0, 0))).tolist() == expected  # tRNS colour key


def cmyk_red() -> Image.Image:
    return Image.new("CMYK", (16, 16), (0, 255, 255, 0))


def test_adobe_cmyk_jpegs_show_their_colours():
    data = encode(cmyk_red(), "JPEG", quality=100)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "CMYK" and opened.info.get("adobe") is not None  # Adobe marker, inverted samples
    assert np.abs(shown(data).astype(int) - [255, 0, 0]).max() <= 2


def ycck_jpeg(cmyk: tuple[int, int, int, int]) -> bytes:
    """A YCCK JPEG (Adobe transform 2) of one CMYK colour. libjpeg decodes YCCK as C, M, Y = 255 - RGB(Y, Cb,
    Cr), K = K, and PIL reads Adobe CMYK inverted, so the stored Y, Cb, Cr are the YCbCr of (C, M, Y) and the
    stored K is 255 - K; PIL's encoder inverts what it is given, so it is given 255 - stored."""
    c, m, y, k = cmyk
    ycc = Image.new("RGB", (1, 1), (c, m, y)).convert("YCbCr").getpixel((0, 0))
    stored = (*ycc, 255 - k)
    data = bytearray(encode(Image.new("CMYK", (16, 16), tuple(255 - v for v in stored)), "JPEG", quality=100))
    at = data.index(b"\xff\xee") + 4  # APP14 "Adobe": version (2), flags0 (2), flags1 (2), transform (1)
    assert data[at : at + 5] == b"Adobe" and data[at + 11] == 0
    data[at + 11] = 2
    return bytes(data)


def test_ycck_jpegs_show_the_same_colours_as_cmyk_ones():
    cmyk = (0, 255, 255, 0)
    data = ycck_jpeg(cmyk)
    assert Image.open(io.BytesIO(data)).info["adobe_transform"] == 2
    assert np.abs(shown(data).astype(int) - [255, 0, 0]).max() <= 3


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        (1, [[[255, 0, 0], [0, 0, 255]]]),  # as stored: red left of blue
        (3, [[[0, 0, 255], [255, 0, 0]]]),  # rotated 180
        (6, [[[255, 0, 0]], [[0, 0, 255]]]),  # rotate 90 clockwise: red on top
        (8, [[[0, 0, 255]], [[255, 0, 0]]]),  # rotate 90 counter-clockwise: blue on top
        (2, [[[0, 0, 255], [255, 0, 0]]]),  # mirrored
    ],
)
def test_exif_orientation_is_applied_as_viewers_do(orientation, expected):
    image = Image.new("RGB", (2, 1), (255, 0, 0))
    image.putpixel((1, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = orientation
    for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 100, "subsampling": 0}), ("WEBP", {"lossless": True})):
        got = shown(encode(image, fmt, exif=exif, **kw)).astype(int)
        assert np.abs(got - expected).max() <= 40, fmt  # JPEG rings between two pure colours


def linear_srgb_profile() -> bytes:
    """sRGB's primaries with a linear tone curve (gamma 1): a profile whose encoded 128 means 50% light."""
    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", profile[128:132])[0]
    for i in range(count):
        signature, offset, _ = struct.unpack(">4sII", profile[132 + 12 * i : 144 + 12 * i])
        if signature in (b"rTRC", b"gTRC", b"bTRC"):
            assert profile[offset : offset + 4] == b"para"
            profile[offset + 8 : offset + 16] = struct.pack(">HHI", 0, 0, 0x10000)  # type 0, gamma 1.0
    return bytes(profile)


def srgb_encoded(linear: float) -> float:
    """The sRGB transfer function (IEC 61966-2-1), 0..1 -> 0..255."""
    v = 12.92 * linear if linear <= 0.0031308 else 1.055 * linear ** (1 / 2.4) - 0.055
    return 255 * v


def test_an_icc_profile_is_converted_to_srgb():
    image = Image.new("RGB", (2, 2), (128, 128, 128))
    expected = srgb_encoded(128 / 255)  # 187.8: the same light, encoded for sRGB
    for fmt in ("PNG", "JPEG", "WEBP"):
        got = shown(encode(image, fmt, icc_profile=linear_srgb_profile(), quality=100))
        assert np.abs(got - expected).max() <= 2, fmt
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert shown(encode(image, "PNG", icc_profile=srgb)).tolist() == [[[128] * 3] * 2] * 2  # left alone
    junk = shown(encode(image, "PNG", icc_profile=b"not a profile"))
    assert junk.tolist() == [[[128] * 3] * 2] * 2  # ignored, as viewers ignore it


def frames(fmt: str) -> bytes:
    first, second = Image.new("RGB", (4, 4), (250, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 250))
    if fmt == "MPO":
        return encode(first, "MPO", save_all=True, append_images=[second], quality=100)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    return encode(first, fmt, save_all=True, append_images=[second], duration=100, loop=0, **kw)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "MPO"])  # PNG: APNG
def test_animated_and_multi_picture_files_show_their_first_frame(fmt):
    data = frames(fmt)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    assert np.abs(shown(data).astype(int) - [250, 0, 0]).max() <= 3


def test_progressive_jpegs_decode():
    image = Image.new("RGB", (32, 32), (30, 160, 90))
    data = encode(image, "JPEG", progressive=True, quality=95)
    assert Image.open(io.BytesIO(data)).info.get("progressive")
    assert np.abs(shown(data).astype(int) - [30, 160, 90]).max() <= 3


def test_pixel_kinds_no_web_format_holds_are_skipped_by_name():
    assert to_rgb(Image.new("F", (2, 2), 0.5)) == "unsupported_image_mode"
    assert to_rgb(Image.new("LAB", (2, 2))) == "unsupported_image_mode"
