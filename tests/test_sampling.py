"""The Hessian examples: seeded, class-stratified, proportional, recorded
(docs/inputs.md, "The Hessian examples")."""

import pytest
import torch
from hessfine.analysis.data import LabeledData
from hessfine.analysis.sampling import allocate, file_sample, stratified_sample
from hypothesis import given, settings
from hypothesis import strategies as st

FAST = settings(max_examples=60, deadline=None, derandomize=True)


@FAST
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12).filter(lambda s: sum(s) > 0),
    fraction=st.floats(0.0, 1.0),
)
def test_allocation_is_proportional_and_covers_every_class(sizes, fraction):
    sizes_t = torch.tensor(sizes)
    total = sum(sizes)
    count = round(fraction * total)
    counts = allocate(sizes_t, count, generator=torch.Generator().manual_seed(0))
    assert int(counts.sum()) == count
    assert bool((counts >= 0).all()) and bool((counts <= sizes_t).all())
    present = sizes_t > 0
    if count >= int(present.sum()):
        assert bool((counts[present] >= 1).all())
        quota = sizes_t.double() * count / total
        if bool((quota[present] >= 1).all()):  # no class lifted to its minimum of one
            assert bool(((counts.double() - quota).abs() < 1).all())
        larger = sizes_t[:, None] > sizes_t[None, :]
        assert bool((counts[:, None] >= counts[None, :])[larger].all())
    else:
        assert bool((counts <= 1).all()) and bool((counts[~present] == 0).all())


def test_sorted_file_gets_every_class_in_proportion():
    """An ImageFolder is sorted by class: the first 30 would all be class 0."""
    y = torch.repeat_interleave(torch.arange(5), torch.tensor([40, 30, 20, 7, 3]))
    sample = stratified_sample(y, 30, generator=torch.Generator().manual_seed(3))
    assert sample.indices.unique().numel() == 30
    picked = torch.bincount(y[sample.indices], minlength=5).tolist()
    assert picked == [12, 9, 6, 2, 1] and sample.per_class == dict(enumerate(picked))
    again = stratified_sample(y, 30, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sample.indices, again.indices)
    other = stratified_sample(y, 30, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(sample.indices, other.indices)
    assert y[sample.indices[:10]].unique().numel() > 1  # mixed order, not class by class


def test_fewer_draws_than_classes_and_more_draws_than_data():
    y = torch.arange(10)
    few = stratified_sample(y, 3, generator=torch.Generator().manual_seed(0))
    assert few.indices.unique().numel() == 3 and len(few.per_class) == 3
    every = stratified_sample(y, 50, generator=torch.Generator().manual_seed(0))
    assert sorted(every.indices.tolist()) == list(range(10))


def test_token_labels_give_a_uniform_sample_and_file_order_is_the_first_n():
    tokens = torch.randint(0, 7, (20, 5))
    sample = stratified_sample(tokens, 6, generator=torch.Generator().manual_seed(0))
    assert sample.per_class is None and sample.indices.unique().numel() == 6
    first = file_sample(torch.tensor([2, 2, 0, 1, 1]), 4)
    assert first.indices.tolist() == [0, 1, 2, 3] and first.per_class == {0: 1, 1: 1, 2: 2}
    record = first.to_json("file", 5)
    assert record == {
        "order": "file",
        "population": 5,
        "indices": [0, 1, 2, 3],
        "per_class": {"0": 1, "1": 1, "2": 2},
    }


@pytest.mark.parametrize("kind", ["tensor", "dict"])
def test_labeled_data_subset_keeps_the_order(kind):
    x = torch.arange(12.0).reshape(6, 2)
    data = LabeledData("d", x if kind == "tensor" else {"a": x}, torch.arange(6))
    part = data.subset(torch.tensor([4, 1]))
    (xb, yb) = next(part.batches(8))
    xb = xb if kind == "tensor" else xb["a"]
    assert yb.tolist() == [4, 1] and torch.equal(xb, x[[4, 1]])
