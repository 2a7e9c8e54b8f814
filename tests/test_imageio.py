"""Decoding and encoding: orientation, modes, metadata minus location, limits, bad inputs, safe writes."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image, ImageCms, JpegImagePlugin
from skimage import data

from uncnn_rt.runtime import imageio, visibility
from uncnn_rt.runtime.errors import (
    DecodeError,
    EmptyFileError,
    ImageTooLargeError,
    InputError,
    NotAnImageError,
    OutputPathError,
    UnreadableFileError,
    UnsupportedImageError,
)
from uncnn_rt.runtime.geometry.warp import Box

DEV_PHOTOS = Path(__file__).resolve().parents[1] / ".." / "shared" / "faces" / "dev" / "photos"
GPS = {1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 0.0)}


def astronaut() -> NDArray[np.uint8]:
    """A non-square real photo (512 x 384), so a 90-degree orientation is visible in the size."""
    return np.ascontiguousarray(data.astronaut()[:, :384])


def srgb_icc() -> bytes:
    return bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def exif_with(orientation: int | None = None, gps: bool = True) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "TestMake"
    exif[0x0110] = "TestModel"
    if orientation is not None:
        exif[0x0112] = orientation
    if gps:
        exif[0x8825] = GPS
    return bytes(exif.tobytes())


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG written by hand (signature, IHDR, one IDAT, IEND), so the header can claim anything."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def reopen(blob: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(blob))
    image.load()
    return image


# ---- decode -----------------------------------------------------------------------------------------


def test_jpeg_orientation_is_applied_and_reset(tmp_path: Path) -> None:
    pixels = astronaut()
    path = tmp_path / "astro.jpg"
    path.write_bytes(encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif_with(6)))
    loaded = imageio.load_image(path)
    assert loaded.orientation == 6 and loaded.was_rotated
    assert loaded.rgb.shape == (384, 512, 3) and loaded.size == (512, 384)
    # Orientation 6 means "rotate 90 degrees clockwise to view": the upright pixels are that rotation.
    upright = np.rot90(pixels, k=-1)
    assert np.abs(loaded.rgb.astype(int) - upright).mean() < 3
    assert loaded.exif is not None
    exif = Image.Exif()
    exif.load(loaded.exif)
    assert exif[0x0112] == 1 and exif[0x010F] == "TestMake"
    assert loaded.format == "JPEG" and loaded.mode == "RGB" and loaded.path == path.resolve()
    assert not loaded.lossless and not loaded.is_grayscale and loaded.bit_depth == 8
    assert any("orientation 6" in note for note in loaded.notes)


def test_grayscale_png_stays_grey_and_exact(tmp_path: Path) -> None:
    grey = data.camera()[::2, ::2]
    path = tmp_path / "grey.png"
    Image.fromarray(grey).save(path)
    loaded = imageio.load_image(path)
    assert loaded.is_grayscale and loaded.mode == "L" and loaded.lossless
    assert (loaded.rgb == grey[:, :, None]).all()
    out = imageio.save_image(loaded.rgb, loaded, tmp_path / "grey.cloaked.png")
    again = reopen(out.read_bytes())
    assert again.mode == "L" and (np.asarray(again) == grey).all()


def test_rgba_png_alpha_is_kept_aside_and_reattached(tmp_path: Path) -> None:
    rgba = np.dstack([astronaut(), np.linspace(0, 255, 384, dtype=np.uint8)[None, :].repeat(512, 0)])
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    loaded = imageio.load_image(path)
    assert loaded.rgb.shape == (512, 384, 3) and loaded.alpha is not None
    assert (loaded.alpha == rgba[:, :, 3]).all()
    perturbed = loaded.rgb.astype(np.float32) + 0.4  # rounds back to the same bytes
    back = reopen(imageio.encode_image(perturbed, loaded, fmt="PNG"))
    assert back.mode == "RGBA" and (np.asarray(back) == rgba).all()
    webp = reopen(imageio.encode_image(loaded.rgb, loaded, fmt="WEBP"))
    assert webp.mode == "RGBA" and (np.asarray(webp) == rgba).all()  # lossless source -> lossless WebP
    jpeg = reopen(imageio.encode_image(loaded.rgb, loaded, fmt="JPEG"))
    assert jpeg.mode == "RGB"  # composited over white
    assert np.asarray(jpeg)[:, 0].mean() > 240  # alpha 0 column -> white


def test_grey_alpha_and_palette_modes() -> None:
    la = Image.fromarray(np.dstack([data.camera()[:64, :64], np.full((64, 64), 128, np.uint8)]), "LA")
    loaded = imageio.load_image(encode(la, "PNG"), name="la.png")
    assert loaded.is_grayscale and loaded.alpha is not None and (loaded.alpha == 128).all()
    assert reopen(imageio.encode_image(loaded.rgb, loaded, fmt="PNG")).mode == "LA"

    palette = Image.fromarray(astronaut()[:64, :64]).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    expected = np.asarray(palette.convert("RGB"))
    loaded = imageio.load_image(encode(palette, "PNG"), name="p.png")
    assert loaded.mode == "P" and loaded.alpha is None and (loaded.rgb == expected).all()
    assert any("palette" in note for note in loaded.notes)
    assert reopen(imageio.encode_image(loaded.rgb, loaded, fmt="PNG")).mode == "RGB"

    palette.info["transparency"] = 0
    loaded = imageio.load_image(encode(palette, "PNG", transparency=0), name="pt.png")
    assert loaded.alpha is not None and set(np.unique(loaded.alpha)) <= {0, 255}

    bilevel = Image.fromarray(data.camera()[:32, :32] > 128)
    loaded = imageio.load_image(encode(bilevel, "PNG"), name="bits.png")
    assert loaded.is_grayscale and set(np.unique(loaded.rgb)) <= {0, 255}


def test_cmyk_jpeg_becomes_rgb_without_its_cmyk_profile() -> None:
    cmyk = Image.fromarray(astronaut()[:64, :64]).convert("CMYK")
    loaded = imageio.load_image(encode(cmyk, "JPEG", quality=95), name="cmyk.jpg")
    assert loaded.mode == "CMYK" and loaded.rgb.shape == (64, 64, 3)
    assert np.abs(loaded.rgb.astype(int) - np.asarray(cmyk.convert("RGB"))).mean() < 3
    out = reopen(imageio.encode_image(loaded.rgb, loaded, fmt="JPEG"))
    assert out.mode == "RGB" and "icc_profile" not in out.info
    # A broken CMYK profile falls back to the plain conversion, and is not carried to the RGB output.
    broken = bytes(16) + b"CMYK" + bytes(108)
    loaded = imageio.load_image(encode(cmyk, "JPEG", quality=95, icc_profile=broken), name="cmyk.jpg")
    assert loaded.icc_profile is None and any("without a colour profile" in n for n in loaded.notes)


def test_sixteen_bit_grey_is_reduced_by_rounding_not_clipping() -> None:
    samples = np.array([[0, 128, 129, 257 * 100 + 128], [65535, 65407, 30000, 1000]], dtype=">u2")
    blob = png_bytes(4, 2, 16, 0, b"".join(b"\x00" + row.tobytes() for row in samples))
    loaded = imageio.load_image(blob, name="deep.png")
    assert loaded.mode.startswith("I") and loaded.bit_depth == 16 and loaded.is_grayscale
    np.testing.assert_array_equal(loaded.rgb[:, :, 0], np.rint(samples.astype(float) / 257))
    assert any("16-bit" in note for note in loaded.notes)
    assert reopen(imageio.encode_image(loaded.rgb, loaded, fmt="PNG")).mode == "L"


def test_sixteen_bit_rgb_is_flagged() -> None:
    raw = b"".join(b"\x00" + bytes([0x12, 0x34, 0xFF, 0x00, 0x80, 0x80]) * 3 for _ in range(2))
    loaded = imageio.load_image(png_bytes(3, 2, 16, 2, raw), name="deep-rgb.png")
    assert loaded.bit_depth == 16 and loaded.rgb.dtype == np.uint8 and loaded.rgb.shape == (2, 3, 3)
    assert any("16-bit" in note for note in loaded.notes)


def test_webp_lossless_and_lossy_are_told_apart() -> None:
    pixels = astronaut()[:96, :96]
    lossless = imageio.load_image(encode(Image.fromarray(pixels), "WEBP", lossless=True), name="l.webp")
    lossy = imageio.load_image(encode(Image.fromarray(pixels), "WEBP", quality=80), name="q.webp")
    assert lossless.lossless and (lossless.rgb == pixels).all()
    assert not lossy.lossless
    assert b"VP8L" in imageio.encode_image(lossless.rgb, lossless, fmt="WEBP")[:40]
    assert b"VP8 " in imageio.encode_image(lossy.rgb, lossy, fmt="WEBP")[:40]


# ---- bad inputs -------------------------------------------------------------------------------------


def test_truncated_jpeg(tmp_path: Path) -> None:
    blob = encode(Image.fromarray(astronaut()), "JPEG", quality=90)
    path = tmp_path / "photo.jpg"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(
        DecodeError, match=r"photo\.jpg: truncated or corrupt image data \(image file is truncated"
    ):
        imageio.load_image(path)


def test_truncated_png(tmp_path: Path) -> None:
    blob = encode(Image.fromarray(astronaut()), "PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DecodeError, match=r"photo\.png: truncated or corrupt"):
        imageio.load_image(path)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 20)
    with pytest.raises(NotAnImageError, match=r"notes\.jpg: not an image"):
        imageio.load_image(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.touch()
    with pytest.raises(EmptyFileError, match=r"empty\.jpg: empty file \(0 bytes\)"):
        imageio.load_image(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(UnreadableFileError, match=r"nowhere\.jpg: no such file"):
        imageio.load_image(tmp_path / "nowhere.jpg")
    with pytest.raises(UnreadableFileError, match="is a directory"):
        imageio.load_image(tmp_path)


def test_png_header_claiming_30000_by_30000_is_refused_before_decoding(tmp_path: Path) -> None:
    tiny = encode(Image.new("RGB", (4, 4)), "PNG")
    ihdr = struct.pack(">II", 30000, 30000) + tiny[24:29]
    forged = tiny[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF) + tiny[33:]
    path = tmp_path / "bomb.png"
    path.write_bytes(forged)
    assert len(forged) < 200
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png: the header declares 900\.0 megapixels"):
        imageio.load_image(path)
    # Under Pillow's own hard limit, the configurable limit speaks first.
    with pytest.raises(ImageTooLargeError, match=r"4x4 is 0\.0 megapixels, over the limit"):
        imageio.load_image(tiny, max_pixels=15, name="small.png")


def _bomb_png(width: int, height: int) -> bytes:
    return png_bytes(width, height, 8, 2, b"\0" * 64)


@pytest.mark.parametrize(
    ("width", "height"),
    [(12000, 10000), (20000, 10000)],  # 120 MP: under Pillow's own hard limit (~179 MP); 200 MP: over it
)
def test_oversized_headers_get_one_message_on_both_sides_of_pillows_limit(width: int, height: int) -> None:
    with pytest.raises(ImageTooLargeError) as caught:
        imageio.load_image(_bomb_png(width, height), name="big.png")
    message = str(caught.value)
    megapixels = f"{width * height / 1e6:.1f} megapixels"
    assert message.startswith("big.png: ") and megapixels in message, message
    tail = "over the limit of 100.0 megapixels (checked before decoding, against decompression bombs)"
    assert message.endswith(f"megapixels, {tail}"), message
    assert "could be decompression bomb DOS attack" not in message  # Pillow's own words stay out
    with pytest.raises(ImageTooLargeError) as probed:
        imageio.probe_image(_bomb_png(width, height), name="big.png")
    assert str(probed.value) == message


def test_probe_reads_the_header_only(tmp_path: Path) -> None:
    blob = encode(Image.fromarray(astronaut()), "JPEG")
    assert imageio.probe_image(blob[: len(blob) // 3], name="cut.jpg") == ("JPEG", (384, 512))
    with pytest.raises(NotAnImageError):
        imageio.probe_image(b"notes, not a photo", name="notes.jpg")


def test_animated_files_are_refused_in_words_that_fit_every_command() -> None:
    frames = [Image.new("RGB", (8, 8), (80 * i, 0, 0)) for i in range(2)]
    blob = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(UnsupportedImageError) as caught:
        imageio.load_image(blob, name="anim.gif")
    assert "cloak" not in str(caught.value)  # compare and classify read photos too


def test_byte_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(encode(Image.fromarray(astronaut()), "PNG"))
    with pytest.raises(
        ImageTooLargeError, match=r"big\.png: file is \d+ bytes, over the limit of 1000 bytes"
    ):
        imageio.load_image(path, max_bytes=1000)


def test_animated_gif_is_refused() -> None:
    frames = [Image.new("RGB", (8, 8), (80 * i, 0, 0)) for i in range(3)]
    blob = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(UnsupportedImageError, match=r"anim\.gif: animated or multi-page GIF \(3 frames\)"):
        imageio.load_image(blob, name="anim.gif")


def test_errors_are_one_line_input_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(InputError) as caught:
        imageio.load_image(path)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(str(path))


# ---- encode -----------------------------------------------------------------------------------------


def test_jpeg_output_keeps_metadata_but_not_location(tmp_path: Path) -> None:
    source = tmp_path / "astro.jpg"
    source.write_bytes(
        encode(Image.fromarray(astronaut()), "JPEG", quality=90, exif=exif_with(6), icc_profile=srgb_icc())
    )
    original = source.read_bytes()
    loaded = imageio.load_image(source)
    out = imageio.save_image(loaded.rgb, loaded, imageio.default_output_path(source))
    assert out == tmp_path / "astro.cloaked.jpg"
    assert source.read_bytes() == original
    written = reopen(out.read_bytes())
    assert written.format == "JPEG" and written.size == loaded.size and written.mode == "RGB"
    assert JpegImagePlugin.get_sampling(written) == 0  # 4:4:4
    assert written.info.get("icc_profile") == srgb_icc()
    exif = written.getexif()
    assert exif[0x010F] == "TestMake" and exif[0x0110] == "TestModel" and exif[0x0112] == 1
    assert 0x8825 not in exif and not exif.get_ifd(0x8825)
    assert np.abs(np.asarray(written).astype(int) - loaded.rgb).mean() < 1.5

    kept = reopen(imageio.encode_image(loaded.rgb, loaded, fmt="JPEG", strip_location=False))
    assert kept.getexif().get_ifd(0x8825)[1] == "N"


def test_gps_is_stripped_from_png_and_webp_too() -> None:
    image = Image.fromarray(astronaut()[:64, :64])
    for fmt in ("PNG", "WEBP"):
        loaded = imageio.load_image(encode(image, fmt, exif=exif_with()), name=f"x.{fmt.lower()}")
        written = reopen(imageio.encode_image(loaded.rgb, loaded, fmt=fmt))
        exif = written.getexif()
        assert exif.get(0x010F) == "TestMake", fmt
        assert 0x8825 not in exif, fmt


def test_output_never_replaces_the_input(tmp_path: Path) -> None:
    source = tmp_path / "me.png"
    Image.fromarray(astronaut()[:32, :32]).save(source)
    original = source.read_bytes()
    loaded = imageio.load_image(source)
    darker = loaded.rgb // 2
    with pytest.raises(OutputPathError, match=r"refusing to overwrite the input"):
        imageio.save_image(darker, loaded, source)
    with pytest.raises(OutputPathError, match=r"refusing to overwrite the input"):
        imageio.save_image(darker, loaded, tmp_path / "sub" / ".." / "me.png")
    link = tmp_path / "link.png"
    link.symlink_to(source)
    with pytest.raises(OutputPathError, match=r"refusing to overwrite the input"):
        imageio.save_image(darker, loaded, link)
    hard = tmp_path / "hard.png"
    os.link(source, hard)
    with pytest.raises(OutputPathError, match=r"refusing to overwrite the input"):
        imageio.save_image(darker, loaded, hard)
    assert source.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.png", "link.png", "me.png"]  # no temp left


def test_output_format_rules(tmp_path: Path) -> None:
    loaded = imageio.load_image(encode(Image.fromarray(astronaut()[:32, :32]), "JPEG"), name="a.jpg")
    assert imageio.output_format(loaded) == "JPEG"
    assert imageio.output_format(loaded, tmp_path / "out.png") == "PNG"
    assert imageio.output_format(loaded, tmp_path / "out", "jpg") == "JPEG"
    with pytest.raises(OutputPathError, match="suffix says PNG but format JPEG"):
        imageio.output_format(loaded, tmp_path / "out.png", "JPEG")
    with pytest.raises(OutputPathError, match="cannot write format 'GIF'"):
        imageio.output_format(loaded, None, "GIF")
    gif = imageio.load_image(encode(Image.new("P", (8, 8)), "GIF"), name="g.gif")
    assert imageio.output_format(gif) == "PNG"
    assert imageio.default_output_path(Path("d/photo.JPG")) == Path("d/photo.cloaked.JPG")
    assert imageio.default_output_path(Path("d/photo.jpg"), "png") == Path("d/photo.cloaked.png")
    assert imageio.default_output_path(Path("anim.gif")) == Path("anim.cloaked.png")
    written = imageio.save_image(loaded.rgb, loaded, tmp_path / "as.webp")
    assert reopen(written.read_bytes()).format == "WEBP"


@pytest.mark.parametrize("name", ["out.xyz", "out", "out.gif"])
def test_an_output_name_that_announces_no_writable_format_is_refused(tmp_path: Path, name: str) -> None:
    loaded = imageio.load_image(encode(Image.fromarray(astronaut()[:32, :32]), "JPEG"), name="a.jpg")
    with pytest.raises(OutputPathError, match="or give the format"):
        imageio.save_image(loaded.rgb, loaded, tmp_path / name)
    with pytest.raises(OutputPathError, match="or give the format"):
        imageio.check_output_path(tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    # With a format, the name is the user's choice.
    written = imageio.save_image(loaded.rgb, loaded, tmp_path / name, format="png")
    assert reopen(written.read_bytes()).format == "PNG"


def test_output_paths_are_checked_before_any_work(tmp_path: Path) -> None:
    source = tmp_path / "me.png"
    source.write_bytes(encode(Image.fromarray(astronaut()[:32, :32]), "PNG"))
    assert imageio.check_output_path(tmp_path / "out.jpg", input_path=source) == "JPEG"
    with pytest.raises(OutputPathError, match="refusing to overwrite the input"):
        imageio.check_output_path(tmp_path / "." / "me.png", input_path=source)
    with pytest.raises(OutputPathError, match="is a directory"):
        imageio.check_output_path(tmp_path, input_path=source)
    with pytest.raises(OutputPathError, match="not a folder"):
        imageio.check_output_path(source / "out.png", input_path=source)
    with pytest.raises(OutputPathError, match="no such folder"):
        imageio.check_output_path(tmp_path / "missing" / "out.png", input_path=source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["me.png"]  # the write check leaves nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into folders without write permission")
def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match="cannot write the output there"):
            imageio.check_output_path(folder / "out.png")
    finally:
        folder.chmod(0o700)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_nobody_can_write_is_refused_before_any_work_even_as_root() -> None:
    """/proc is a folder in which no one, root included, can create a file: the check tries to create
    one rather than reading permission bits (which root passes, and which say nothing of such mounts).
    Runs as root too, which is how CI runs."""
    with pytest.raises(OutputPathError, match=r"^/proc: cannot write the output there"):
        imageio.check_output_path(Path("/proc") / "out.png")


@pytest.mark.parametrize("quality", [40, 60, 75, 85, 90, 97])
def test_jpeg_quality_is_estimated_from_the_quantisation_tables(quality: int) -> None:
    blob = encode(Image.fromarray(astronaut()), "JPEG", quality=quality)
    assert imageio.load_image(blob, name="q.jpg").jpeg_quality == quality
    assert imageio.load_image(encode(Image.fromarray(astronaut()), "PNG")).jpeg_quality is None


@pytest.mark.parametrize("quality", [75, 85, 92])
def test_a_jpeg_cloak_is_saved_at_about_the_inputs_quality(quality: int) -> None:
    """The cloak adds a little entropy, 4:4:4 chroma keeps it; the file stays near the input's size
    (at the former fixed q95 it came out 1.3-2x as large)."""
    rgb = astronaut()
    blob = encode(Image.fromarray(rgb), "JPEG", quality=quality, subsampling=0)
    loaded = imageio.load_image(blob, name="me.jpg")
    noise = np.random.default_rng(0).integers(-2, 3, rgb.shape)
    cloaked = np.clip(loaded.rgb.astype(int) + noise, 0, 255).astype(np.uint8)
    out = imageio.encode_image(cloaked, loaded, fmt="JPEG")
    assert len(out) <= 1.25 * len(blob), (len(out), len(blob))
    assert imageio.load_image(out).jpeg_quality == quality


def test_jpeg_output_quality_is_kept_in_range() -> None:
    """The README's promise, in its literal values: a JPEG keeps its quality within 75..95; other inputs
    saved as JPEG get 95."""

    def quality_of(fmt: str, **params: object) -> int:
        return imageio.jpeg_output_quality(
            imageio.load_image(encode(Image.fromarray(astronaut()), fmt, **params))
        )

    assert quality_of("JPEG", quality=30) == 75
    assert quality_of("JPEG", quality=74) == 75
    assert quality_of("JPEG", quality=75) == 75
    assert quality_of("JPEG", quality=85) == 85  # within the range: kept
    assert quality_of("JPEG", quality=95) == 95
    assert quality_of("JPEG", quality=96) == 95
    assert quality_of("JPEG", quality=100) == 95
    assert quality_of("PNG") == 95
    assert quality_of("WEBP", quality=60) == 95
    assert (imageio.JPEG_QUALITY_RANGE, imageio.DEFAULT_JPEG_QUALITY) == ((75, 95), 95)


@pytest.mark.parametrize(("fmt", "source"), [("JPEG", "JPEG"), ("WEBP", "JPEG"), ("PNG", "PNG")])
def test_the_lossy_round_trip_is_what_the_written_file_holds(fmt: str, source: str) -> None:
    rgb = astronaut()[100:260, 150:310]
    loaded = imageio.load_image(encode(Image.fromarray(rgb), source, quality=80), name="me.jpg")
    cloaked = np.clip(loaded.rgb.astype(int) + np.random.default_rng(1).integers(-3, 4, rgb.shape), 0, 255)
    cloaked = cloaked.astype(np.uint8)
    saved = imageio.lossy_round_trip(loaded, fmt=fmt)
    if fmt == "PNG":
        assert saved is None
        return
    assert saved is not None and saved.format == fmt
    for output in (saved, saved.at(97)):
        written = imageio.encode_image(cloaked, loaded, fmt=fmt, quality=output.quality)
        np.testing.assert_array_equal(output(cloaked), imageio.load_image(written).rgb)
    assert saved.quality == (80 if fmt == "JPEG" else imageio.DEFAULT_WEBP_QUALITY)
    # A region's JPEG window (visibility.jpeg_window) loses what the whole photo loses there.
    if fmt == "JPEG":
        region = Box(37, 51, 121, 140)
        window, inner = visibility.jpeg_window(cloaked.shape, region)
        alone = saved(np.ascontiguousarray(cloaked[window.slices]))[inner.slices]
        np.testing.assert_array_equal(alone, saved(cloaked)[region.slices])
    with pytest.raises(InputError, match="quality must be in"):
        saved.at(101)


def test_pixels_are_rounded_and_checked() -> None:
    loaded = imageio.load_image(encode(Image.fromarray(astronaut()[:16, :16]), "PNG"), name="a.png")
    noisy = loaded.rgb.astype(np.float32) + np.float32(0.49)
    noisy[0, 0] = [-20.0, 300.0, 127.5]
    back = np.asarray(reopen(imageio.encode_image(noisy, loaded, fmt="PNG")))
    assert (back[1:] == loaded.rgb[1:]).all() and back[0, 0].tolist() == [0, 255, 128]
    with pytest.raises(InputError, match=r"shape \[16, 16, 3\]"):
        imageio.encode_image(loaded.rgb[:8], loaded, fmt="PNG")
    with pytest.raises(InputError, match="NaN"):
        imageio.encode_image(np.full((16, 16, 3), np.nan, np.float32), loaded, fmt="PNG")
    with pytest.raises(InputError, match="quality"):
        imageio.encode_image(loaded.rgb, loaded, fmt="JPEG", quality=0)


@pytest.mark.shared
@pytest.mark.skipif(
    not DEV_PHOTOS.is_dir(), reason="development photos ../shared/faces/dev/photos not present"
)
def test_dev_photos_round_trip_in_format_size_and_mode(tmp_path: Path) -> None:
    photos = sorted(DEV_PHOTOS.glob("*.jpg"))
    assert photos
    for photo in photos:
        loaded = imageio.load_image(photo)
        out = imageio.save_image(loaded.rgb, loaded, tmp_path / imageio.default_output_path(photo).name)
        written = reopen(out.read_bytes())
        with Image.open(photo) as original:
            assert (written.format, written.size, written.mode) == (
                original.format,
                original.size,
                original.mode,
            )
        assert np.abs(np.asarray(written).astype(int) - loaded.rgb).mean() < 1.5, photo.name


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path: Path) -> None:
    from uncnn_rt.runtime.fileio import atomic_write_bytes

    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    atomic = tmp_path / "atomic.bin"
    atomic_write_bytes(atomic, b"y")
    assert atomic.read_bytes() == b"y"
    assert (atomic.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)
    assert not list(tmp_path.glob(".*.tmp"))
