"""The images payload (stored without pickle) and its collator: example order, per-sample dims, M-RoPE rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from sftune.data import vision_batch as vb
from sftune.data.packing import collate


def test_payload_round_trip_keeps_arrays_and_drops_the_per_sample_dim():
    pv = np.random.rand(1, 5, 3, 4, 4).astype(np.float32)  # Idefics3: [1 sample, tiles, C, H, W]
    mask = np.ones((1, 5, 4, 4), dtype=bool)
    d = vb.decode(vb.encode({"pixel_values": pv, "pixel_attention_mask": mask},
                             spans=[(0, 9), (12, 21)], sizes=[(30, 20), (8, 8)]))
    assert d["pixel_values"].shape == (5, 3, 4, 4) and np.array_equal(d["pixel_values"], pv[0])
    assert d["pixel_attention_mask"].shape == (5, 4, 4) and sorted(d[vb.BATCHED].tolist()) == sorted(
        ["pixel_values", "pixel_attention_mask"])
    assert d[vb.N_IMAGES] == 2 and d[vb.TOKENS].tolist() == [9, 9]
    assert vb.images_of(vb.encode({}, spans=[(3, 9)], sizes=[(30, 20)])) == [
        {"start": 3, "tokens": 6, "size": [30, 20]}]
    llava = vb.decode(vb.encode({"pixel_values": np.zeros((2, 3, 4, 4), np.float32)},
                                 spans=[(0, 4), (5, 9)], sizes=[(4, 4)] * 2))
    assert llava["pixel_values"].shape == (2, 3, 4, 4) and llava[vb.BATCHED].tolist() == []


def test_mrope_positions_by_hand():
    # text t t, an image of grid (1, 4, 6) merged by 2 -> 2 x 3 tokens, then text
    ids = [5, 5] + [9] * 6 + [5, 5]
    pos = vb.mrope_positions(ids, 9, [[1, 4, 6]], 2)
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    assert pos[0, 2:8].tolist() == [2] * 6
    assert pos[1, 2:8].tolist() == [2, 2, 2, 3, 3, 3] and pos[2, 2:8].tolist() == [2, 3, 4, 2, 3, 4]
    assert pos[:, 8:].tolist() == [[5, 6]] * 3  # after the image: start + max(h, w)


def test_collator_keeps_example_order_and_places_mrope_per_example():
    def example(n_text, tag, grid):
        ids = [1] * n_text + [9] * (grid[1] * grid[2] // 4)
        payload = vb.encode({"pixel_values": np.full((grid[1] * grid[2], 2), tag, np.float32),
                             "image_grid_thw": np.asarray([grid])},
                            mrope=vb.mrope_positions(ids, 9, [grid], 2), spans=[(n_text, len(ids))], sizes=[(8, 8)])
        return ids, [-100] * len(ids), None, {"images": payload}

    a, b, c = example(2, 1.0, (1, 2, 2)), example(1, 2.0, (1, 4, 2)), example(3, 3.0, (1, 2, 2))
    text = ([1, 2, 3], [-100, 2, 3])
    batch = collate([[a, text], [b, c]], pad_id=0)
    mi = batch.model_inputs
    assert mi["pixel_values"][:, 0].tolist() == [1.0] * 4 + [2.0] * 8 + [3.0] * 4  # row 0, then row 1 by offset
    assert mi["image_grid_thw"].tolist() == [[1, 2, 2], [1, 4, 2], [1, 2, 2]]
    pos = mi["position_ids"]
    assert pos.shape == (4, 2, batch.input_ids.shape[1])
    assert pos[0].tolist() == batch.position_ids.tolist()  # the 1-D positions: per-example masks
    assert pos[1:, 0, :3].tolist() == [[0, 1, 2]] * 3  # example a: text, then its one image token at 2
    assert pos[1:, 0, 3:6].tolist() == [[0, 1, 2]] * 3  # the text-only example: its own 1-D positions
    assert pos[:, 1, 2].tolist() == [2, 1, 2, 1]  # example b's second image token: 1-D 2; t 1, h 1+1, w 1+0


def test_summary_counts_kept_examples_only():
    col = pa.chunked_array([pa.array([vb.encode({}, spans=[(0, 4), (5, 11)]), None, vb.encode({}, spans=[(0, 2)])],
                                     pa.binary())])
    s = vb.summary(col, np.array([True, True, False]))
    assert s == {"images": 2, "examples": 1, "image_tokens": 10, "tokens_per_image": {"min": 4, "mean": 5.0, "max": 6}}
    assert vb.summary(col, np.array([False, True, False])) == {}
