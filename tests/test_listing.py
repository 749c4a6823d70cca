"""The listing stage: a run's inputs written once to ``_listing.arrow`` (never held by the
driver), listing files (``--input-list``: text, CSV, Parquet), and the crash guard's cost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline import crash_guard
from pipeline.digits import write_samples
from pipeline.input_lists import listed_paths
from pipeline.listing import InputError, ListingFile
from pipeline.read import is_image_name
from pipeline.walk import Walk


def test_a_directory_is_walked_in_a_stable_order_one_directory_at_a_time(tmp_path):
    for name in ["b/2.png", "b/1.png", "a/z/9.png", "a/3.png", "c.png", "a.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    walk = Walk(str(tmp_path), is_image_name, "an image", "images")
    paths = [p.removeprefix(f"{tmp_path}/") for p, _ in walk]
    assert paths == ["c.png", "a/3.png", "a/z/9.png", "b/1.png", "b/2.png"]
    assert walk.skipped_or_fail() == {"not an image extension: .txt": 1}


def test_the_formats_of_a_photo_library_are_taken_and_the_rest_counted_by_extension(tmp_path):
    """Phones' HEIC (and Canon's .hif), AVIF and JPEG 2000 are images; what is left out is
    counted under its extension (the commonest five, then the rest together)."""
    images = ["IMG_0001.HEIC", "b.heif", "c.hif", "d.avif", "e.jp2", "f.j2k", "g.JPG", "h.apng"]
    left = ["IMG_0001.MOV", "IMG_0002.MOV", "IMG_0003.MOV", "raw.dng", "raw2.dng", "README",
            "x.json", "y.xmp", "z.aae", "w.pdf"]
    for name in images + left:
        (tmp_path / name).write_bytes(b"x")
    walk = Walk(str(tmp_path), is_image_name, "an image", "images")
    assert sorted(p.rsplit("/", 1)[1] for p, _ in walk) == sorted(images)
    assert walk.skipped_or_fail() == {
        "not an image extension: .mov": 3, "not an image extension: .dng": 2,
        "not an image extension: no extension": 1, "not an image extension: .aae": 1,
        "not an image extension: .json": 1, "not an image extension: others": 2}


def test_hidden_names_are_left_out_and_counted_unless_named(tmp_path):
    """A photo library copied from a Mac holds a ``._`` file beside every photo (an image's
    extension, not an image), and viewers leave ``.thumbnails/``: none of them is an input."""
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(60)
    for name in ["IMG_1.jpg", "._IMG_1.jpg", ".DS_Store", "trip/IMG_2.png", "trip/._IMG_2.png",
                 ".thumbnails/large/IMG_1.png", "trip/.git/x.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(apple_double)
    walk = Walk(str(tmp_path), is_image_name, "an image", "images")
    assert [p.removeprefix(f"{tmp_path}/") for p, _ in walk] == ["IMG_1.jpg", "trip/IMG_2.png"]
    assert walk.skipped_or_fail() == {"hidden, a name starting with '.'": 3,
                                      "folder hidden, a name starting with '.'; not walked": 2}
    # Named, they are read: a file, and a glob whose pattern names the dot.
    for src, found in [(tmp_path / "._IMG_1.jpg", ["._IMG_1.jpg"]),
                       (tmp_path / ".thumbnails/*/*.png", [".thumbnails/large/IMG_1.png"])]:
        walk = Walk(str(src), is_image_name, "an image", "images")
        assert [p.removeprefix(f"{tmp_path}/") for p, _ in walk] == found

    (tmp_path / "trip" / "IMG_2.png").unlink()
    with pytest.raises(InputError, match=r"holds no images, only hidden names \(1 folder \(hidden, .* 1 file "
                       r"\(hidden.*pass --input-list"):
        walk = Walk(str(tmp_path / "trip"), is_image_name, "an image", "images")
        assert list(walk) == []
        walk.skipped_or_fail()


def test_listing_files_of_every_kind_stream_in_their_order(tmp_path):
    paths = [f"s3://bucket/img/{i:04d}.jpg" for i in (3, 1, 2)]
    (tmp_path / "list.txt").write_text("# a comment\n" + "\n".join(paths) + "\n\n")
    pcsv.write_csv(pa.table({"bucket": ["b"] * 3, "path": paths}), tmp_path / "list.csv")
    pq.write_table(pa.table({"key": paths, "size": [1, 2, 3]}), tmp_path / "list.parquet")
    for name in ("list.txt", "list.csv", "list.parquet"):
        assert [p for p, _ in listed_paths(str(tmp_path / name))] == paths, name
    listing = ListingFile.write(str(tmp_path / "out"), listed_paths(str(tmp_path / "list.txt")))
    assert listing.count == 3 and listing.read(1, 3).column("path").to_pylist() == paths[1:]
    (tmp_path / "nums.parquet").write_bytes(b"")
    with pytest.raises(InputError, match="Cannot read listing file"):
        list(listed_paths(str(tmp_path / "nums.parquet")))


def test_a_path_listed_again_keeps_its_first_place_only(tmp_path, monkeypatch):
    paths = [f"/img/{i % 1500}.png" for i in range(3000)] + ["/img/late.png", "/img/0.png"]
    listing = ListingFile.write(str(tmp_path), ((p, None) for p in paths))
    assert listing.count == 1501 and listing.skipped == {"listed more than once": 1501}
    unique = [*paths[:1500], "/img/late.png"]
    again = ListingFile.write(str(tmp_path / "again"), ((p, None) for p in unique))
    assert listing.read(0, 1501).column("path").to_pylist() == unique
    assert again.sha256 == listing.sha256 and not again.skipped  # what --resume compares
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [Path(listing.uri).name]
    # Paths are told apart by their text, not their hash: every hash the same drops nothing.
    monkeypatch.setattr("pipeline.listing.hash", lambda _: 7, raising=False)
    collided = ListingFile.write(str(tmp_path / "collided"), ((p, None) for p in paths[::-1]))
    assert collided.count == 1501 and collided.skipped == {"listed more than once": 1501}


def test_an_input_list_runs_exactly_its_inputs_and_resumes(ray_local, tmp_path):
    src = tmp_path / "images"
    write_samples(src, 30, seed=3)
    chosen = sorted(str(p) for p in src.rglob("*.*"))[::3]  # every third image
    listing = tmp_path / "inputs.txt"
    repeated = [chosen[0], f"{chosen[1]}\n{chosen[1]}"]  # listed again: still one row each
    listing.write_text("\n".join([*chosen, *repeated, str(src / "missing.png")]) + "\n")
    out = tmp_path / "out"
    summary = pipeline.run(str(listing), str(out), input_list=True, rows_per_file=4)
    assert summary.skipped == {"listed more than once": 3}
    assert pq.read_table(out).num_rows == len(chosen) + 1
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert sorted(rows) == sorted([*chosen, str(src / "missing.png")])
    assert rows[str(src / "missing.png")]["error_kind"] == "unreadable"
    assert (summary.rows_ok, summary.rows_error) == (len(chosen), 1)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["inputs"] == len(chosen) + 1
    parts = sorted(out.glob("part-*.parquet"))
    for part in parts[1:]:
        part.unlink()
    again = pipeline.run(str(listing), str(out), input_list=True, rows_per_file=4, resume=True)
    assert again.rows_resumed == pq.read_metadata(parts[0]).num_rows
    assert pq.read_table(out).num_rows == len(chosen) + 1


class FakeExecutor:
    """Stands in for the device: counts calls, never fails."""

    def __init__(self):
        self.calls = 0

    def run_isolating(self, images):
        self.calls += 1
        return {"x": np.zeros((len(images), 1), np.float32)}, [None] * len(images)

    def zeros(self, n):
        return {"x": np.zeros((n, 1), np.float32)}


def test_a_restarted_actor_records_once_per_block(monkeypatch):
    """The crash guard of a restarted actor writes to the GCS once per block (not per device
    batch, as it did: ~100 writes a second per actor), and image by image only for the block
    its predecessor died on."""
    kv: dict[str, dict] = {}
    puts: list[str] = []

    class Context:
        was_current_actor_reconstructed = True

        def get_actor_id(self):
            return "actor-1"

    import ray

    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    monkeypatch.setattr(crash_guard, "_get", lambda key: kv.get(key))
    monkeypatch.setattr(crash_guard, "_put",
                        lambda key, state: (puts.append(key), kv.__setitem__(key, state)))
    died_on = [f"/img/{i}.png" for i in range(1024, 2048)]
    kv["run/actor-1"] = {"block": crash_guard._digest(died_on), "row": None, "strikes": {}}
    guard = crash_guard.CrashGuard("run")
    executor = FakeExecutor()
    images = np.zeros((1024, 8, 8, 1), np.uint8)
    for first in (0, 2048, 3072):  # three healthy blocks of 1,024 rows
        guard.run(executor, images, [f"/img/{i}.png" for i in range(first, first + 1024)])
    assert len(puts) == 3 and executor.calls == 3 and not guard.isolated
    guard.run(executor, images, died_on)  # the block that killed the last process
    assert guard.isolated and executor.calls == 3 + 1024 and len(puts) == 3 + 1024
