"""The toy world's sample grids carry their row labels and title."""
import numpy as np
import torch

from toyworld.grids import FONT_SIZE, PAD, labelled_grid


def test_each_row_is_labelled_at_its_left_and_the_title_is_on_top():
    rows = {"no LoRA": torch.zeros(3, 24, 24, 3), "OMG": torch.ones(3, 24, 24, 3)}  # black row, white row
    grid = np.asarray(labelled_grid(rows, columns=2, title="a man and a woman", scale=4).convert("L"))
    title_height, cell = FONT_SIZE + 2 * PAD, 26 * 4
    label_width = grid.shape[1] - 2 * cell
    assert grid.shape == (title_height + 2 * cell, label_width + 2 * cell)
    assert label_width > 40  # room for the longest label
    assert (grid[:title_height] < 128).any()  # the title's text
    for r in range(2):
        label = grid[title_height + r * cell:title_height + (r + 1) * cell, :label_width]
        assert (label < 128).any(), f"row {r} has no label"
    assert grid[title_height + cell // 2, label_width + cell // 2] == 0  # the black row's image
    assert grid[title_height + cell + cell // 2, label_width + cell // 2] == 255
