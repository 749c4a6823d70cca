"""How a run is cut into decode tasks and blocks, and what a decode task yields (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import digit_images
from PIL import Image

from pipeline import dataflow
from pipeline.model import load_model
from pipeline.shards import Source


@pytest.mark.parametrize("n", [1, 31, 200, 2_000, 20_000, 1_000_003])
@pytest.mark.parametrize("actors,slots", [(1, 2), (4, 60)])
@pytest.mark.parametrize("image_bytes", [32 * 32, 224 * 224 * 3, 4000 * 3000 * 3])
def test_tasks_and_blocks_cover_every_unit(n, actors, slots, image_bytes):
    rows = dataflow.rows_per_block(n, actors, 32, image_bytes)
    per_task = dataflow.units_per_task(n, rows, slots)
    assert rows % 32 == 0 and rows <= dataflow.MAX_ROWS_PER_BLOCK
    assert rows == 32 or rows * image_bytes <= dataflow.BLOCK_BYTES  # one batch at least
    assert per_task % rows == 0 and per_task <= dataflow.BLOCKS_PER_TASK * rows
    tables = Source().blocks([f"{i}.png" for i in range(n)], set(), per_task)
    assert sum(t.num_rows for t in tables) == n
    assert [t.column("path")[0].as_py() for t in tables] == [f"{i}.png" for i in range(0, n, per_task)]
    if n >= 2 * slots * dataflow.BLOCKS_PER_TASK * rows:  # big input: big tasks
        assert per_task == dataflow.BLOCKS_PER_TASK * rows
    if n >= 2 * slots * rows:  # enough work: every decode slot gets two tasks
        assert len(tables) >= 2 * slots


def test_a_task_yields_blocks_of_at_most_rows(tmp_path):
    images, _ = digit_images(10)
    paths = []
    for i, img in enumerate(images):
        path = tmp_path / f"{i}.png"
        Image.fromarray(img[:, :, 0]).save(path)
        paths.append(str(path))
    spec = load_model().spec
    blocks = list(Source().decode({"path": np.array(paths, object)}, spec, 10**8, 4))
    assert [len(b["path"]) for b in blocks] == [4, 4, 2]
    assert [p for b in blocks for p in b["path"]] == paths
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in blocks]), images)
