"""Every image-like file yields exactly one row: a bad file is an error row that says why, a
valid but unusual image is predicted, and other files are skipped and counted.

The corpus is generated here, in ``tmp_path``; the main test runs the real ``batch-infer run``
in a subprocess. As root, file permissions do not bind, so that subprocess runs without the
capabilities that bypass them (``setpriv``), the way an ordinary user's run would; where that
cannot be done, the corpus has no unreadable files.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
import urllib.parse
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from driver import Driver, can_drop_root_file_access
from PIL import Image

import pipeline
from pipeline import digits, source
from pipeline.decode import DecodeError, decode_image
from pipeline.model import load_model
from pipeline.walk import list_images

OK = "ok"
BOMB = (r"image holds {} pixels, over the max_pixels limit of 100,000,000 "
        r"\(possible decompression bomb\)")
DIGIT_INDEX = 4  # a held-out "3" that the bundled model gets right in every encoding, and
DIGIT_LABEL = "3"  # reads as a "0" when turned 90 degrees: orientation must be applied


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png_header_only(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header claims width x height 8-bit gray pixels."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    idat = zlib.compress(b"\0" * 1024)
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def ico_holding(png: bytes) -> bytes:
    """An ICO whose one entry says 256x256 and holds ``png``, whatever that PNG's size."""
    header = (0).to_bytes(2, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
    entry = bytes([0, 0, 0, 0]) + (1).to_bytes(2, "little") + (32).to_bytes(2, "little")
    entry += len(png).to_bytes(4, "little") + (6 + 16).to_bytes(4, "little")
    return header + entry + png


def the_digit(size: int = 64) -> Image.Image:
    _, (x, y) = digits.load_split()
    assert str(y[DIGIT_INDEX]) == DIGIT_LABEL
    return digits.render(x[DIGIT_INDEX], size)


def can_enforce_permissions() -> bool:
    return os.geteuid() != 0 or can_drop_root_file_access()


def build_corpus(root: Path) -> tuple[dict[str, str], set[str], dict[str, int]]:
    """Write the corpus under ``root``. Returns (path -> "ok" or a regex its error must match,
    the paths that must be predicted as the digit, what the summary must count as skipped)."""
    digit = the_digit()
    rgb = digit.convert("RGB")
    png, jpeg = encode(digit, "PNG"), encode(rgb, "JPEG", quality=95)
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # a byte of the IHDR checksum
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to display
    broken_exif = bytearray(encode(rgb, "JPEG", exif=exif))
    at = broken_exif.find(b"Exif\0\0") + 14
    broken_exif[at : at + 4] = b"\xff\xff\xff\xff"  # IFD entry count that runs off the end
    second_frame = Image.new("L", digit.size, 0)
    gray16 = Image.fromarray(np.asarray(digit).astype(np.uint16) * 257)  # mode I;16

    digit_files = {  # valid images, each must be predicted as the digit
        "formats/valid.jpg": jpeg,
        "formats/valid.png": png,
        "formats/valid.gif": encode(digit, "GIF"),
        "formats/valid.bmp": encode(rgb, "BMP"),
        "formats/valid.tiff": encode(rgb, "TIFF"),
        "formats/valid.webp": encode(rgb, "WEBP", lossless=True),
        "formats/valid.ppm": encode(rgb, "PPM"),
        "formats/progressive.jpeg": encode(rgb, "JPEG", progressive=True),
        "modes/gray16.png": encode(gray16, "PNG"),
        "modes/gray16.tif": encode(gray16, "TIFF"),
        "modes/float01.tif": encode(Image.fromarray(np.asarray(digit, np.float32) / 255), "TIFF"),
        "modes/cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "modes/rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "modes/palette.png": encode(rgb.convert("P"), "PNG"),
        "modes/palette_transparent.png": encode(rgb.convert("P"), "PNG", transparency=0),
        "modes/one_bit.png": encode(digit.convert("1"), "PNG"),
        "modes/la.png": encode(digit.convert("LA"), "PNG"),
        "modes/animated.gif": encode(digit, "GIF", save_all=True, append_images=[second_frame]),
        "modes/animated.webp": encode(rgb, "WEBP", save_all=True,
                                      append_images=[second_frame.convert("RGB")]),
        "modes/multipage.tiff": encode(digit, "TIFF", save_all=True, append_images=[second_frame]),
        "modes/exif_rotated.jpg": encode(digit.transpose(Image.Transpose.ROTATE_90).convert("RGB"),
                                         "JPEG", quality=95, exif=exif),
        "names/lying extension png.jpg": png,
        "names/lying extension jpeg.png": jpeg,
        "names/with space.png": png,
        "names/ünïcødé 数字.png": png,
        "names/100%.png": png,
        "names/%41%2F escaped.png": png,
        "names/#hash?.png": png,
        "names/-dash.png": png,
        "names/new\nline.png": png,
        "names/UPPER.JPG": jpeg,
        "names/Mixed.PnG": png,
        "names/nested/a/b/c/deep.png": png,
    }
    other_ok = {  # valid, but no digit to recognise
        "modes/broken_exif.jpg": bytes(broken_exif),
        "sizes/1x1.png": encode(Image.new("L", (1, 1), 128), "PNG"),
        "sizes/5000x1.png": encode(Image.new("L", (5000, 1), 128), "PNG"),
        "sizes/1x5000.jpg": encode(Image.new("RGB", (1, 5000), "white"), "JPEG"),
        "sizes/3x2.bmp": encode(Image.new("RGB", (3, 2), "black"), "BMP"),
        "formats/valid.ico": encode(rgb, "ICO"),
    }
    bad = {  # file name -> (bytes, regex the error must match)
        "bad/zero.png": (b"", r"empty file \(0 bytes\)"),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], r"JPEG data is truncated or corrupt"),
        "bad/truncated.png": (png[: len(png) // 2], r"PNG data is truncated or corrupt"),
        "bad/text.jpg": (b"hello, I am text\n",
                         r"not a recognised image format \(starts with b'hello"),
        "bad/page.jpeg": (b"<!DOCTYPE html><html><body>404</body></html>",
                          r"not a recognised image format \(starts with b'<!DOCTYPE html"),
        "bad/bad_crc.png": (bytes(bad_crc), r"not a readable PNG file: .*bad header checksum"),
        "bad/png_signature_only.png": (png[:8], r"not a readable PNG file"),
        "bad/jpeg_header_only.jpg": (jpeg[:20], r"not a readable JPEG file"),
        "bad/gif_header_only.gif": (b"GIF89a\x10\x00",
                                    r"(not a readable GIF file|GIF data is truncated)"),
        "bad/random.webp": (np.random.default_rng(0).bytes(4096), r"not a recognised image format"),
        "bad/bomb.png": (png_header_only(12_000, 12_000), BOMB.format("144,000,000")),
        "bad/huge_bomb.png": (png_header_only(100_000, 100_000), BOMB.format("10,000,000,000")),
        "bad/nested_bomb.ico": (ico_holding(png_header_only(11_000, 11_000)),  # says 256x256
                                BOMB.format("121,000,000")),
    }
    expected: dict[str, str] = {}

    def put(rel: str, data: bytes, expect: str) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[str(path)] = expect
        return path

    for rel, data in {**digit_files, **other_ok}.items():
        put(rel, data, OK)
    for rel, (data, pattern) in bad.items():
        put(rel, data, pattern)

    special = root / "special"
    special.mkdir()
    os.symlink(root / "formats" / "valid.png", special / "link_to_valid.png")
    expected[str(special / "link_to_valid.png")] = OK
    os.symlink(special / "missing.png", special / "broken_link.png")
    expected[str(special / "broken_link.png")] = (
        r"broken symbolic link: .* points to .*missing\.png")
    os.symlink(special / "loop_b.png", special / "loop_a.png")
    os.symlink(special / "loop_a.png", special / "loop_b.png")
    for name in ("loop_a.png", "loop_b.png"):
        expected[str(special / name)] = r"Too many levels of symbolic links"
    os.mkfifo(special / "fifo.png")  # reading would wait for a writer forever
    expected[str(special / "fifo.png")] = r"named pipe \(FIFO\), not a regular file"
    os.symlink("/dev/zero", special / "endless.jpg")  # reading would never end
    expected[str(special / "endless.jpg")] = r"character device, not a regular file"
    os.symlink(root, special / "loop_dir")  # a directory link back up: must not list twice
    (special / "folder.jpg").mkdir()  # a directory with an image's name is not a file
    put("special/folder.jpg/inside.png", png, OK)
    skipped = {}
    if can_enforce_permissions():
        locked = put("special/no_permission.png", png, r"PermissionError: .*Permission denied")
        locked.chmod(0)
        (special / "locked_dir").mkdir()
        (special / "locked_dir" / "unseen.png").write_bytes(png)
        (special / "locked_dir").chmod(0)  # cannot be listed: counted, its files unknown
        skipped["folder not readable"] = 1
    raw = os.fsencode(special) + b"/latin1_caf\xe9.png"  # not UTF-8: stored as a file:// URI
    with open(raw, "wb") as f:
        f.write(png)
    expected["file://" + urllib.parse.quote(raw)] = OK
    digit_paths = {str(root / rel) for rel in digit_files} | {str(special / "link_to_valid.png")}
    digit_paths.add("file://" + urllib.parse.quote(raw))

    others = ["notes.txt", "data.json", "README", "names/drawing.svg", "bad/archive.zip"]
    for rel in others:
        (root / rel).write_bytes(b"not an image")
    left_out = {f"not an image extension: {ext}": n
                for ext, n in (("no extension", 1), (".txt", 1), (".json", 1), (".svg", 1), (".zip", 1))}
    # Hidden names are not inputs: a Mac's "._" file beside a photo (an image's extension,
    # not an image), a hidden image, a viewer's thumbnail folder (not walked).
    for rel, data in [(".DS_Store", b"\0\0\0\1Bud1"), ("names/._UPPER.JPG", b"\0\5\26\7Mac OS X"),
                      ("names/.hidden.png", png), (".thumbnails/large/valid.png", png)]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    hidden = {"hidden, a name starting with '.'": 3,
              "folder hidden, a name starting with '.'; not walked": 1}
    return expected, digit_paths, {**left_out, **skipped, **hidden}


@pytest.mark.slow
def test_bad_input_corpus_through_the_cli(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    expected, digit_paths, skipped = build_corpus(src)
    result = Driver(["run", "--input", src, "--output", out, "--batch-size", 16, "--no-progress"],
                    drop_root_file_access=True).wait()
    assert result.returncode == 0, result.stderr[-3000:]

    rows = pq.read_table(out).to_pylist()
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "a file has more than one row"
    missing, extra = sorted(set(expected) - set(paths)), sorted(set(paths) - set(expected))
    assert not missing and not extra, f"missing: {missing}, extra: {extra}"
    wrong = []
    for r in rows:
        want = expected[r["path"]]
        if want == OK:
            if r["status"] != "ok" or r["error"] is not None or r["label_name"] is None:
                wrong.append((r["path"], "expected ok", r["error"]))
            elif r["path"] in digit_paths and r["label_name"] != DIGIT_LABEL:
                wrong.append((r["path"], f"predicted {r['label_name']}, not {DIGIT_LABEL}", None))
        elif r["status"] != "error" or not re.search(want, r["error"] or ""):
            wrong.append((r["path"], f"expected error matching {want!r}", r["error"]))
        elif r["label"] is not None or r["topk_scores"] is not None:
            wrong.append((r["path"], "error row carries a prediction", None))
    assert not wrong, "\n".join(map(str, wrong))

    summary = json.loads((out / "_summary.json").read_text())
    errors = sum(v != OK for v in expected.values())
    assert summary["completed"]
    assert (summary["rows_ok"], summary["rows_error"]) == (len(expected) - errors, errors)
    assert summary["skipped"] == skipped
    assert ("skipped: 5 files (not an image extension: 1 no extension, 1 .json, 1 .svg, 1 .txt, "
            "1 .zip)") in result.stdout
    assert "3 files (hidden, a name starting with '.')" in result.stdout
    assert "1 folder (hidden, a name starting with '.'; not walked)" in result.stdout
    if "folder not readable" in skipped:
        assert "skipped: 1 folder (not readable)" in result.stdout
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("part-")) == [
        "_listing.arrow", "_manifest.json", "_report.html", "_summary.json"]

    # Errors are grouped by kind, in each row and in the summary: the data's fault or not.
    kinds = {r["path"]: r["error_kind"] for r in rows}
    assert all(kinds[p] is None for p, want in expected.items() if want == OK)
    wrong_kind = {p: kinds[p] for p, want in expected.items()
                  if want != OK and kinds[p] != kind_of_error(p)}
    assert not wrong_kind, wrong_kind
    counts = {k: v["count"] for k, v in summary["errors_by_kind"].items()}
    assert counts == dict(Counter(kind_of_error(p) for p, w in expected.items() if w != OK))
    assert all(set(v["examples"]) <= set(expected) for v in summary["errors_by_kind"].values())


# The error_kind each bad file of the corpus must get, by its name.
KINDS = {"zero.png": "not_an_image", "text.jpg": "not_an_image", "page.jpeg": "not_an_image",
         "random.webp": "not_an_image", "truncated.jpg": "corrupt", "truncated.png": "corrupt",
         "bad_crc.png": "corrupt", "png_signature_only.png": "corrupt",
         "jpeg_header_only.jpg": "corrupt", "gif_header_only.gif": "corrupt",
         "bomb.png": "too_large", "huge_bomb.png": "too_large", "nested_bomb.ico": "too_large"}


def kind_of_error(path: str) -> str:
    """Files under special/ fail to be read at all (links, FIFOs, devices, permissions)."""
    return KINDS.get(Path(path).name, "unreadable")


def test_file_vanishing_between_listing_and_reading(ray_local, tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    png = encode(the_digit(), "PNG")
    for i in range(6):
        (src / f"{i}.png").write_bytes(png)
    victims = [src / "2.png", src / "4.png"]

    real_list = source.Source.list

    def list_then_lose_files(self, where: str, into: str):
        listing = real_list(self, where, into)  # the real listing, then the files go away
        for path in victims:
            path.unlink()
        return listing

    monkeypatch.setattr(source.Source, "list", list_then_lose_files)  # what the run lists with
    summary = pipeline.run(str(src), str(tmp_path / "out"), progress=False)
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert len(rows) == 6 and (summary.rows_ok, summary.rows_error) == (4, 2)
    for path in victims:
        assert rows[str(path)]["status"] == "error"
        assert "no longer exists (removed or renamed after listing)" in rows[str(path)]["error"]


def test_a_stale_input_list_on_one_machine_gives_error_rows(ray_local, tmp_path):
    """A list naming files that are gone (an old export, a list made elsewhere) is not a node
    that cannot see the input: the driver does not see them either. Each is an error row."""
    png = encode(the_digit(), "PNG")
    listed = [tmp_path / f"{i}.png" for i in range(5)]
    for path in listed[1::2]:  # the first, middle and last are gone: every sample
        path.write_bytes(png)
    (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in listed))
    summary = pipeline.run(str(tmp_path / "list.txt"), str(tmp_path / "out"), input_list=True,
                           progress=False)
    assert (summary.rows_ok, summary.rows_error) == (2, 3)
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    for path in listed[0::2]:
        assert rows[str(path)]["error_kind"] == "unreadable", rows[str(path)]


def test_exif_orientation_is_applied():
    spec = load_model().spec
    stored = np.zeros((32, 64), np.uint8)  # (H, W): left half black, right half white
    stored[:, 32:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise: the black half ends up on top
    shown = decode_image(encode(Image.fromarray(stored).convert("RGB"), "JPEG", exif=exif), spec)
    plain = decode_image(encode(Image.fromarray(stored).convert("RGB"), "JPEG"), spec)
    assert plain[:, :12].mean() < 10 and plain[:, -12:].mean() > 245  # left dark, right light
    assert shown[:12].mean() < 10 and shown[-12:].mean() > 245  # top dark, bottom light


def test_animated_image_uses_its_first_frame():
    spec = load_model().spec
    digit = the_digit()
    black = Image.new("L", digit.size, 0)
    first = decode_image(encode(digit, "GIF", save_all=True, append_images=[black]), spec)
    assert np.abs(first.astype(int) - decode_image(encode(digit, "PNG"), spec)).max() <= 1
    last_first = decode_image(encode(black, "GIF", save_all=True, append_images=[digit]), spec)
    assert last_first.max() == 0


def test_decompression_bomb_is_refused_without_allocating(tmp_path):
    """Headers claiming 12,000^2 (144 MB of gray pixels) and 50,000^2 (2.5 GB), and a 256x256
    ICO holding an 11,000^2 PNG, are decoded in a process that cannot map 128 MB more than it
    starts with: refusing them must take no pixel memory. Our limit is the one applied, to
    the nested PNG too, in both directions (a higher one lets a 12,000^2 header through)."""
    bombs = {"png12k": png_header_only(12_000, 12_000), "png50k": png_header_only(50_000, 50_000),
             "ico": ico_holding(png_header_only(11_000, 11_000))}
    for name, data in bombs.items():
        (tmp_path / name).write_bytes(data)
    code = textwrap.dedent(f"""
        import resource
        from pipeline.decode import DecodeError, decode_image
        from pipeline.model import ModelSpec
        spec = ModelSpec(height=32, width=32, channels=1, class_names=("a",))
        data = [open(f"{tmp_path}/{{name}}", "rb").read() for name in {list(bombs)!r}]
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + 2**27, resource.RLIM_INFINITY))
        for d in data:
            try:
                decode_image(d, spec)
            except DecodeError as e:
                print("refused:", e)
        try:
            decode_image(data[0], spec, max_pixels=150_000_000)
        except Exception as e:
            print("limit 150M:", type(e).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for line, pixels in zip(lines, ("144,000,000", "2,500,000,000", "121,000,000")):
        assert line.startswith("refused: ") and re.search(BOMB.format(pixels), line), line
    # Allowed under a higher limit, decoding starts and hits the RLIMIT: so the limit that
    # refused it above was ours, and the RLIMIT does catch an allocation.
    assert lines[3] == "limit 150M: MemoryError"


def test_decode_errors_name_the_problem():
    spec = load_model().spec
    with pytest.raises(DecodeError, match=r"empty file"):
        decode_image(b"", spec)
    with pytest.raises(DecodeError, match=r"4,096 pixels, over the max_pixels limit of 1,000"):
        decode_image(encode(the_digit(), "PNG"), spec, max_pixels=1000)


def test_listing_follows_links_once_and_counts_what_it_skips(tmp_path):
    src = tmp_path / "photos [2019]"  # glob characters in a real directory name
    (src / "sub").mkdir(parents=True)
    png = encode(the_digit(), "PNG")
    (src / "a.png").write_bytes(png)
    (src / "sub" / "b.PNG").write_bytes(png)
    (src / "sub" / "notes.txt").write_text("x")
    os.symlink(src, src / "sub" / "back_to_top")  # a loop
    listing = list_images(str(src))
    assert listing.paths == [str(src / "a.png"), str(src / "sub" / "b.PNG")]
    assert listing.skipped == {"not an image extension: .txt": 1}
