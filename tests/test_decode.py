"""Preprocessing declared by the model: decode against references written here directly with
Pillow (torchvision's eval Resize + CenterCrop, ``ImageOps.pad``), on odd sizes and aspect
ratios, every mode, several filters, L and RGB; EXIF orientation in every mode; JPEG draft
within its stated tolerance; the bundled digits path unchanged; the photo generator."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline import digits, resize
from pipeline.decode import decode_image, decode_payloads
from pipeline.model import ModelSpec, load_model
from pipeline.photos import oriented, photo, write_photos

# (width, height): a pixel, strips, needles, odd sizes both ways, exactly a target's size,
# smaller than the targets (upscaling).
SIZES = [(1, 1), (3, 500), (500, 3), (17, 1000), (1000, 17), (333, 222), (222, 333),
         (640, 480), (480, 640), (32, 32), (24, 40), (20, 15), (7, 9)]
TARGETS = [(32, 32), (24, 40)]  # (width, height)
MODES = ("squash", "center_crop", "pad")
FILTERS = {name: getattr(Image.Resampling, name.upper())
           for name in ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")}
SMOOTH = ("bilinear", "hamming", "bicubic", "lanczos")  # the filters draft is allowed for


def make_spec(target, channels=3, mode="squash", interpolation="bilinear", **kw) -> ModelSpec:
    return ModelSpec(height=target[1], width=target[0], channels=channels, class_names=("x",),
                     resize=mode, interpolation=interpolation, **kw)


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def source(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return photo(np.random.default_rng((seed, *size)), *size)


# ------------------------------------------------------------ references: Pillow only


def reference(data: bytes, spec: ModelSpec) -> np.ndarray:
    """What the spec promises, from a full decode."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    img = img.convert("L" if spec.channels == 1 else "RGB")
    size, f = (spec.width, spec.height), FILTERS[spec.interpolation]
    if spec.resize == "squash":
        out = img.resize(size, f)
    elif spec.resize == "center_crop":
        out = center_crop_reference(img, size, spec.crop_fraction, f)
    else:
        out = pad_reference(img, size, f, spec.pad_value)
    return np.asarray(out).reshape(spec.shape)


def torchvision_resize(img: Image.Image, size: int, f) -> Image.Image:
    """torchvision.transforms.Resize(size) (an int: the shorter side) on a PIL image."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), f)


def torchvision_center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision.transforms.CenterCrop(size), for an image at least that big."""
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))  # noqa: RUF046
    return img.crop((left, top, left + size, top + size))


def cover(img_size, size, fraction):
    """Non-square generalisation: the size that covers floor(w/f) x floor(h/f), keeping the
    aspect ratio (the binding side exact, the other rounded down), and the crop's corner."""
    (w, h), (sw, sh) = size, img_size
    bw, bh = math.floor(w / fraction), math.floor(h / fraction)
    new = (bw, int(bw * sh / sw)) if bw / sw >= bh / sh else (int(bh * sw / sh), bh)
    return new, (round((new[0] - w) / 2.0), round((new[1] - h) / 2.0))


def elongated(img_size, size, fraction) -> bool:
    new, _ = cover(img_size, size, fraction)
    return new[0] * new[1] > resize.MAX_INTERMEDIATE * size[0] * size[1]


def center_crop_reference(img: Image.Image, size, fraction, f) -> Image.Image:
    w, h = size
    if elongated(img.size, size, fraction):
        # Documented: the crop resampled straight from the source, same geometry.
        (nw, nh), (left, top) = cover(img.size, size, fraction)
        sw, sh = img.size
        box = (left * sw / nw, top * sh / nh, (left + w) * sw / nw, (top + h) * sh / nh)
        return img.resize(size, f, box=box)
    if w == h:
        return torchvision_center_crop(torchvision_resize(img, math.floor(w / fraction), f), w)
    new, (left, top) = cover(img.size, size, fraction)
    return img.resize(new, f).crop((left, top, left + w, top + h))


def pad_reference(img: Image.Image, size, f, value: int) -> Image.Image:
    fill = value if img.mode == "L" else (value,) * 3
    if min(ImageOps.contain(img, size, f).size) > 0:
        return ImageOps.pad(img, size, f, color=fill, centering=(0.5, 0.5))
    # ImageOps.pad draws nothing where the scaled short side rounds to 0: we keep 1 pixel.
    (w, h), (sw, sh) = size, img.size
    line = (w, 1) if sw > sh else (1, h)
    out = Image.new(img.mode, size, fill)
    out.paste(img.resize(line, f), (round((w - line[0]) * 0.5), round((h - line[1]) * 0.5)))
    return out


def test_reference_center_crop_is_torchvision_geometry():
    """The non-square reference agrees with torchvision's for square targets."""
    for img_size in SIZES:
        for side in (32, 224):
            new, corner = cover(img_size, (side, side), 0.875)
            resized = torchvision_resize(Image.new("L", img_size), math.floor(side / 0.875), 0)
            assert new == resized.size, img_size
            w, h = resized.size
            assert corner == (round((w - side) / 2.0), round((h - side) / 2.0))


# ------------------------------------------------------------ exact equality


def mismatches(data: bytes, specs, **kw) -> list[str]:
    bad = []
    for spec in specs:
        got, want = decode_image(data, spec, **kw), reference(data, spec)
        if got.shape != want.shape or not np.array_equal(got, want):
            diff = np.abs(got.astype(int) - want).max() if got.shape == want.shape else "shape"
            bad.append(f"{spec.resize}/{spec.interpolation}/{spec.width}x{spec.height}x"
                       f"{spec.channels}: max diff {diff}")
    return bad


def all_specs(filters=tuple(FILTERS)):
    for target in TARGETS:
        for mode in MODES:
            for i, interpolation in enumerate(filters):
                for channels in (1, 3):
                    extra = {"pad_value": 114} if mode == "pad" and i % 2 else {}
                    yield make_spec(target, channels, mode, interpolation, **extra)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_png_equals_reference(size):
    data = encode(source(size), "PNG")
    assert mismatches(data, all_specs()) == []


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_jpeg_without_draft_equals_reference(size):
    data = encode(source(size, seed=1), "JPEG", quality=90)
    specs = all_specs(("nearest", "bilinear", "bicubic", "lanczos"))
    assert mismatches(data, specs, draft=False) == []


@pytest.mark.parametrize("fraction", [1.0, 0.9, 0.5])
def test_other_crop_fractions_equal_reference(fraction):
    specs = [make_spec(t, 3, "center_crop", "bicubic", crop_fraction=fraction)
             for t in [(224, 224), (24, 40), (40, 24)]]
    for size in [(333, 222), (222, 333), (640, 480), (97, 1203)]:
        assert mismatches(encode(source(size), "PNG"), specs) == [], size


def test_squash_of_an_exactly_sized_image_is_the_image():
    img = source((32, 32))
    for mode in MODES:
        out = decode_image(encode(img, "PNG"), make_spec((32, 32), 3, mode, "nearest",
                                                         crop_fraction=1.0))
        np.testing.assert_array_equal(out, np.asarray(img))


def test_pad_fills_with_pad_value_around_a_centred_image():
    img = Image.new("RGB", (40, 20), (200, 100, 50))
    out = decode_image(encode(img, "PNG"), make_spec((32, 32), 3, "pad", pad_value=7))
    np.testing.assert_array_equal(out[:8], 7)  # (32 - 16) / 2 rows above
    np.testing.assert_array_equal(out[24:], 7)
    np.testing.assert_array_equal(out[8:24], np.broadcast_to([200, 100, 50], (16, 32, 3)))


def test_elongated_crop_stays_close_to_torchvision():
    """Past MAX_INTERMEDIATE the crop is resampled from the source: same geometry as
    torchvision's resize-then-crop, at most one level of rounding apart (smooth filters)."""
    img = source((3, 500))
    assert elongated(img.size, (32, 32), 0.875)
    for name in SMOOTH[:2]:
        got = decode_image(encode(img, "PNG"), make_spec((32, 32), 3, "center_crop", name))
        want = torchvision_center_crop(torchvision_resize(img, 36, FILTERS[name]), 32)
        assert np.abs(got.astype(int) - np.asarray(want)).max() <= 1, name


# ------------------------------------------------------------ EXIF orientation


def test_oriented_box_follows_the_pixels():
    """A box around each stored pixel lands, after orientation, around the same pixel."""
    stored = Image.fromarray(np.arange(15, dtype=np.uint8).reshape(3, 5), "L")  # 5 x 3
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        upright = ImageOps.exif_transpose(Image.open(io.BytesIO(encode(stored, "PNG",
                                                                        exif=exif))))
        pixels = np.asarray(upright)
        for y in range(3):
            for x in range(5):
                x0, y0, x1, y1 = resize.oriented_box((x, y, x + 1, y + 1), (5, 3), orientation)
                assert (x1 - x0, y1 - y0) == (1, 1)
                assert pixels[int(y0), int(x0)] == y * 5 + x, (orientation, x, y)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_in_every_mode(orientation):
    """Odd sizes, so a drafted JPEG's partial last block moves with the flip."""
    upright = source((301, 203), seed=2)
    data = oriented(upright, orientation, quality=90)
    plain = encode(upright, "JPEG", quality=90)
    for mode in MODES:
        spec = make_spec((48, 32), 3, mode, "bicubic")
        want = reference(data, spec)
        np.testing.assert_array_equal(decode_image(data, spec, draft=False), want)
        within_tolerance(decode_image(data, spec), want, f"{mode} orientation {orientation}")
        # Upright: close to the same photo stored upright (JPEG blocks differ), far from the
        # photo turned any other way.
        same = np.abs(decode_image(plain, spec, draft=False).astype(int) - want).mean()
        assert same < 2.5, (mode, same)
    turned = decode_image(data, make_spec((48, 32)), draft=False)
    wrong = decode_image(encode(upright.transpose(Image.Transpose.ROTATE_180), "PNG"),
                         make_spec((48, 32)))
    assert np.abs(turned.astype(int) - wrong).mean() > 10


# ------------------------------------------------------------ JPEG draft


def within_tolerance(got: np.ndarray, want: np.ndarray, what: str) -> None:
    d = np.abs(got.astype(np.int16) - want.astype(np.int16))
    mean, p999 = float(d.mean()), float(np.percentile(d, 99.9))
    limit = resize.DRAFT_TOLERANCE
    assert mean <= limit["mean"] and p999 <= limit["p99.9"], f"{what}: {mean:.2f}, {p999}"


def test_draft_stays_within_tolerance():
    engaged = 0
    cases = [((1003, 749), 85), ((2000, 1500), 50), ((1600, 400), 95), ((301, 1203), 75),
             ((640, 480), 90)]
    for (size, quality), seed in zip(cases, range(10, 20)):
        data = encode(source(size, seed), "JPEG", quality=quality)
        for target in [(224, 224), (96, 64), (32, 32)]:
            for mode in MODES:
                for i, name in enumerate(SMOOTH):
                    spec = make_spec(target, 1 + 2 * (i % 2), mode, name)
                    got, full = decode_image(data, spec), decode_image(data, spec, draft=False)
                    within_tolerance(got, reference(data, spec), f"{size} {spec}")
                    engaged += not np.array_equal(got, full)
    assert engaged >= 120, engaged  # 135 of 180 cases: where the margin allows a smaller decode


def test_no_draft_for_nearest_and_box():
    data = encode(source((2000, 1500)), "JPEG", quality=85)
    for name in ("nearest", "box"):
        for mode in MODES:
            spec = make_spec((32, 32), 3, mode, name)
            np.testing.assert_array_equal(decode_image(data, spec), reference(data, spec))


# ------------------------------------------------------------ the bundled digits model


def before_this_change(data: bytes, spec: ModelSpec) -> np.ndarray:
    """decode_image as it was (squash, bilinear, JPEG drafted down to the target size)."""
    img = Image.open(io.BytesIO(data))
    mode = "L" if spec.channels == 1 else "RGB"
    if img.format == "JPEG":
        img.draft(mode, (max(spec.width, spec.height),) * 2)
    img = ImageOps.exif_transpose(img).convert(mode)
    return np.asarray(img.resize((spec.width, spec.height), Image.Resampling.BILINEAR))


def test_digits_path_unchanged():
    """The bundled model's inputs are bit-identical for PNGs and for JPEGs the old code did not
    shrink (under 64 px for 32x32). Bigger JPEGs are no longer drafted down to 1x the target
    (that moved digit pixels by up to 93 levels); they stay within tolerance of a full decode."""
    spec = load_model().spec
    assert (spec.resize, spec.interpolation, spec.shape) == ("squash", "bilinear", (32, 32, 1))
    _, (x, _) = digits.load_split()
    rng = np.random.default_rng(7)
    for i, values in enumerate(x[:60]):
        size = int(rng.integers(16, 129))
        img = digits.render(values, size, ("nearest", "bilinear")[i % 2], rgb=i % 3 == 0)
        for fmt in ("PNG", "JPEG"):
            data = digits.encode(img, fmt, quality=int(rng.integers(40, 96)))
            got = decode_image(data, spec)
            if fmt == "PNG" or size < 64:
                np.testing.assert_array_equal(got[..., 0], before_this_change(data, spec))
            else:
                within_tolerance(got, decode_image(data, spec, draft=False), f"digit {size}px")


# ------------------------------------------------------------ phone and web formats

# Formats a photo library holds beside JPEG: HEIC (phones, through pillow-heif), AVIF and
# JPEG 2000 (Pillow's own). Lossless or near it, so the decode can be held to a PNG's.
OTHER_FORMATS = {"HEIF": {"quality": -1}, "AVIF": {"quality": 100}, "JPEG2000": {}}


@pytest.mark.parametrize(("fmt", "orientation"), [
    *((fmt, o) for fmt in ("HEIF", "AVIF") for o in (1, 3, 6, 7)),
    ("JPEG2000", 1),  # Pillow writes no EXIF into a JPEG 2000
])
def test_heic_avif_and_jpeg2000_decode_upright(fmt, orientation):
    """Each is stored turned, with the EXIF orientation that turns it back: the decode is the
    upright photo (a HEIF's turn is libheif's, an AVIF's is ours), far from any other turn."""
    upright = source((301, 203), seed=4)
    options = OTHER_FORMATS[fmt]
    data = oriented(upright, orientation, fmt, **options) if orientation > 1 else \
        encode(upright, fmt, **options)
    spec = make_spec((48, 32), 3, "center_crop", "bicubic")
    want = decode_image(encode(upright, "PNG"), spec).astype(int)
    got = decode_image(data, spec).astype(int)
    assert np.abs(got - want).mean() < 1.5, fmt
    turned = decode_image(encode(upright.transpose(Image.Transpose.ROTATE_180), "PNG"), spec)
    assert np.abs(got - turned).mean() > 10


@pytest.mark.parametrize("fmt", OTHER_FORMATS)
def test_a_cut_heic_avif_or_jpeg2000_is_a_corrupt_row_naming_its_format(fmt):
    data = encode(source((120, 90)), fmt)
    spec = make_spec((32, 32))
    for cut in (len(data) // 2, 40):
        row = decode_payloads(["x"], [data[:cut]], spec)
        assert row["error_kind"][0] == "corrupt", (cut, row["error"][0])
        assert fmt in row["error"][0], row["error"][0]


def test_a_heic_without_its_reader_says_what_to_install(monkeypatch):
    """pillow-heif is a dependency, but a hand-made environment may lack it: the row says so,
    not 'not a recognised image format'."""
    monkeypatch.setattr(Image, "OPEN", {k: v for k, v in Image.OPEN.items() if k != "HEIF"})
    monkeypatch.setattr(Image, "ID", [k for k in Image.ID if k != "HEIF"])
    row = decode_payloads(["x"], [encode(source((40, 30)), "HEIF")], make_spec((32, 32)))
    assert "'heic' image" in row["error"][0] and "pip install pillow-heif" in row["error"][0]


# ------------------------------------------------------------ photos


def test_photos_are_deterministic_photo_sized_jpegs(tmp_path):
    paths = write_photos(tmp_path / "a", 6, seed=3)
    again = write_photos(tmp_path / "b", 6, seed=3)
    other = write_photos(tmp_path / "c", 6, seed=4)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    assert paths[0].read_bytes() != other[0].read_bytes()
    sizes = [p.stat().st_size for p in paths]
    assert 15_000 < np.median(sizes) < 60_000, sizes  # a 480x360 q85 web photo: ~30 KB
    with Image.open(paths[0]) as img:
        assert (img.format, img.size, img.mode) == ("JPEG", (480, 360), "RGB")


def test_photos_written_in_slices_are_the_photos_one_call_writes(tmp_path, monkeypatch):
    """The bench writes its photos in slices on all cores: the same files as one call."""
    from pipeline.bench import workload

    whole = write_photos(tmp_path / "whole", 7, size=(48, 32), seed=0)
    parts = (write_photos(tmp_path / "parts", 3, size=(48, 32), seed=0)
             + write_photos(tmp_path / "parts", 4, size=(48, 32), seed=0, start=3))
    assert [p.name for p in parts] == [p.name for p in whole]
    assert [p.read_bytes() for p in parts] == [p.read_bytes() for p in whole]
    monkeypatch.setattr(workload, "cores", lambda: 2)
    workload._write_photos(tmp_path / "pool", 1003, (16, 12))  # 3 slices in 2 processes
    pooled = sorted((tmp_path / "pool").iterdir())
    assert len(pooled) == 1003 and pooled[-1].name == "photo_01002.jpg"
    assert pooled[1000].read_bytes() == write_photos(tmp_path / "one", 1, (16, 12),
                                                     start=1000)[0].read_bytes()


def test_photos_rotated_and_png(tmp_path):
    paths = write_photos(tmp_path, 24, size=(96, 64), seed=5, rotated=0.5, png=0.25)
    pngs = [p for p in paths if p.suffix == ".png"]
    turned = [p for p in paths if "_o" in p.stem]
    assert pngs and turned and len(pngs) + len(turned) < len(paths)
    for p in turned:
        i = int(p.stem.split("_")[1])
        upright = np.asarray(photo(np.random.default_rng((5, i)), 96, 64), np.int16)
        with Image.open(p) as img:
            shown = np.asarray(ImageOps.exif_transpose(img), np.int16)
        assert shown.shape == upright.shape, p.name
        error = np.abs(shown - upright).mean()  # JPEG's loss at q85, on a small textured image
        assert error < 8 and error < np.abs(shown - upright[::-1, ::-1]).mean() / 3, p.name
