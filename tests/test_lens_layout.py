"""The logit lens picture's rows: as few as LENS_ROW_TOKENS positions a row allow, of near-equal length, so that
an 18-token prompt is two rows of 9, not a row of 16 and a nearly empty row of 2."""

import math

import matplotlib.image
import pytest
import torch

from llama3_raw.tools.pictures import LENS_ROW_TOKENS, lens_panels, plot_logit_lens


@pytest.mark.parametrize("seq_len, sizes", [
    (1, [1]), (9, [9]), (16, [16]), (17, [9, 8]), (18, [9, 9]), (31, [16, 15]), (32, [16, 16]), (33, [11, 11, 11]),
    (34, [12, 11, 11]), (100, [15, 15, 14, 14, 14, 14, 14]),
])
def test_positions_split_into_balanced_rows(seq_len, sizes):
    assert [len(row) for row in lens_panels(seq_len)] == sizes


def test_every_length_is_covered_once_in_the_fewest_rows_that_differ_by_one_at_most():
    for seq_len in range(1, 300):
        rows = lens_panels(seq_len)
        assert [p for row in rows for p in row] == list(range(seq_len))
        assert len(rows) == math.ceil(seq_len / LENS_ROW_TOKENS)
        assert max(map(len, rows)) <= LENS_ROW_TOKENS and max(map(len, rows)) - min(map(len, rows)) <= 1


def draw(path, seq_len: int, n_layers: int = 3):
    probs = torch.rand(n_layers, seq_len, generator=torch.Generator().manual_seed(seq_len))
    labels = [f"t{i}" for i in range(seq_len)]
    plot_logit_lens(path, labels, [labels] * n_layers, probs)
    return matplotlib.image.imread(path).shape[:2]  # (height, width) in pixels


def test_an_18_token_picture_is_two_rows_of_9(tmp_path):
    height_16, width_16 = draw(tmp_path / "16.png", 16)
    height_18, width_18 = draw(tmp_path / "18.png", 18)
    height_9, width_9 = draw(tmp_path / "9.png", 9)
    assert width_18 == width_9 < width_16  # rows 9 cells wide, not 16 with a 2-cell tail
    assert height_18 > 1.5 * height_16  # and two of them
