"""What a decode task does with its slice of the listing (no Ray), and how slices meet the
committed parts on --resume."""

from __future__ import annotations

import numpy as np
from conftest import digit_images
from PIL import Image

from pipeline import dataflow
from pipeline.listing import ListingFile
from pipeline.model import load_model
from pipeline.source import Source
from pipeline.write import part_name


def test_a_task_yields_blocks_of_at_most_rows_and_skips_what_is_done(tmp_path):
    images, _ = digit_images(10)
    paths = []
    for i, img in enumerate(images):
        path = tmp_path / f"{i}.png"
        Image.fromarray(img[:, :, 0]).save(path)
        paths.append(str(path))
    listing = ListingFile.write(str(tmp_path / "out"), ((p, None) for p in paths))
    spec = load_model().spec
    table = listing.read(0, 10)
    blocks = list(Source().decode(table, np.arange(10), set(), spec, 10**8, 4))
    assert [len(b["path"]) for b in blocks] == [4, 4, 2]
    assert [p for b in blocks for p in b["path"]] == paths
    assert [u for b in blocks for u in b["_unit"]] == list(range(10))
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in blocks]), images)
    done = {paths[1], paths[7]}
    again = list(Source().decode(table, np.arange(10), done, spec, 10**8, 4))
    assert [u for b in again for u in b["_unit"]] == [0, 2, 3, 4, 5, 6, 8, 9]


def test_listing_file_reads_any_slice(tmp_path):
    paths = [f"/x/{i:05d}.png" for i in range(3000)]
    listing = ListingFile.write(str(tmp_path), ((p, i) for i, p in enumerate(paths)))
    assert listing.count == 3000 and listing.largest == 2999
    for lo, hi in [(0, 1), (0, 3000), (1023, 1025), (1024, 2048), (2999, 3000), (5, 2100)]:
        table = listing.read(lo, hi)
        assert table.column("path").to_pylist() == paths[lo:hi]
        assert table.column("size").to_pylist() == list(range(lo, hi))


def test_slices_get_exactly_the_parts_that_meet_them():
    """A wrong overlap test (<= for <, or parts matched by start only) hands a task parts it
    does not need or, worse, misses one and recomputes committed rows."""
    parts = [part_name(np.arange(a, b), [f"{a}-{b}"]) for a, b in
             [(0, 100), (100, 250), (240, 260), (600, 700), (999, 1000)]]
    slices = dataflow._slices(1000, 250, parts)
    assert [(lo, hi) for lo, hi, _ in slices] == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    assert [len(meets) for _, _, meets in slices] == [3, 1, 1, 1]
    assert slices[0][2] == parts[:3] and slices[1][2] == [parts[2]]
    assert slices[2][2] == [parts[3]] and slices[3][2] == [parts[4]]
