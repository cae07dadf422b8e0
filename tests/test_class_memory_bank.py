"""ClassMemoryBank on its own: the ring buffer against a sequential FIFO, the fixed-point
per-class sums against a recount, staging that writes nothing, and the state check.

Every comparison is exact (``torch.equal``): the bank copies rows and adds integers, and the
reference computes the same integers ``trunc(x * 2^bits)`` row by row."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pml_proxies.utils import ClassMemoryBank
from pml_proxies.utils.class_memory_bank import BUFFERS, fixed_point_bits

PATHS = pytest.mark.parametrize("sync_free", [False, True], ids=["host_sizes", "fixed_shape"])


def fifo_reference(bank: ClassMemoryBank, pushes) -> dict:
    """The bank's buffers after ``pushes`` ``(rows, labels, keep)``, by a slot-by-slot loop."""
    T, C, D = bank.capacity, bank.num_classes, bank.embedding_size
    dtype = bank.embeddings.dtype
    embeddings, labels = torch.zeros(T, D, dtype=dtype), torch.full((T,), -1)
    position = count = 0
    for rows, row_labels, keep in pushes:
        for i in range(rows.shape[0]):
            if keep is not None and not bool(keep[i]):
                continue
            embeddings[position], labels[position] = rows[i].to(dtype), row_labels[i]
            position, count = (position + 1) % T, min(count + 1, T)
    filled = labels >= 0
    sums = torch.zeros(C, D, dtype=torch.long)
    for t in range(T):
        if filled[t]:
            sums[labels[t]] += (embeddings[t] * 2.0**bank.fixed_point_bits).long()
    return {
        "embeddings": embeddings,
        "labels": labels,
        "write_position": torch.tensor(position),
        "count": torch.tensor(count),
        "class_counts": torch.bincount(labels[filled], minlength=C),
        "class_sums": sums,
    }


def random_pushes(C, D, sizes, gen, dtype, with_keep):
    pushes = []
    for size in sizes:
        rows = F.normalize(torch.randn(size, D, generator=gen, dtype=torch.float64), dim=1)
        # tiny coordinates: their truncation toward zero matters
        rows[:, 0] *= 10.0 ** -torch.randint(5, 14, (size,), generator=gen)
        labels = torch.randint(0, C, (size,), generator=gen)
        keep = torch.rand(size, generator=gen) < 0.6 if with_keep else None
        pushes.append((rows.to(dtype), labels, keep))
    return pushes


def assert_state(bank: ClassMemoryBank, expected: dict) -> None:
    for name in BUFFERS:
        assert torch.equal(getattr(bank, name), expected[name]), name


@PATHS
@pytest.mark.parametrize("with_keep", [False, True], ids=["all", "kept"])
@pytest.mark.parametrize(
    "C, T, sizes",
    [(3, 7, (4, 9, 16, 2, 1, 7)), (40, 30, (5, 45, 12, 31, 3))],
    ids=["few_classes", "many_classes"],
)
def test_ring_buffer_and_sums_equal_a_sequential_fifo(C, T, sizes, with_keep, sync_free, dtype):
    """Pushes smaller and larger than the capacity, wrap-around, kept subsets: after every push
    the slots, labels, position, count, per-class counts and fixed-point sums equal the loop's."""
    gen = torch.Generator().manual_seed(0)
    bank = ClassMemoryBank(T, C, 4).to(dtype)
    bank.sync_free_updates = sync_free
    pushes = random_pushes(C, 4, sizes, gen, dtype, with_keep)
    wrapped = False
    for n in range(len(pushes)):
        before = int(bank.write_position)
        bank.push(*pushes[n])
        wrapped |= int(bank.write_position) < before or pushes[n][0].shape[0] >= T
        assert_state(bank, fifo_reference(bank, pushes[: n + 1]))
    assert wrapped and int(bank.count) == T


def test_a_push_larger_than_the_capacity_keeps_the_last_rows_in_fifo_slots():
    bank = ClassMemoryBank(4, 10, 2)
    bank.push(F.normalize(torch.ones(1, 2)), torch.tensor([9]))  # position 1
    rows = torch.eye(2).repeat(5, 1)  # 10 rows
    bank.push(rows, torch.arange(10))
    # rows 6..9 survive; row r sits in slot (1 + r) % 4
    assert bank.labels.tolist() == [7, 8, 9, 6]
    assert (int(bank.write_position), int(bank.count)) == (3, 4)
    assert bank.class_counts.tolist() == [0] * 6 + [1] * 4


@pytest.mark.parametrize("capacity", [1, 5, 2**21, 2**22, 2**30, 2**40])
def test_fixed_point_bits_leave_room_for_capacity_unit_vectors(capacity):
    """40 bits while they fit; fewer from 2^22 slots on: ``capacity`` coordinates of magnitude 1
    sum to at most ``capacity * 2^bits`` < 2^62 (int64 with a bit to spare for a step's change)."""
    bits = fixed_point_bits(capacity)
    assert bits == min(40, 62 - capacity.bit_length())
    assert capacity * 2**bits < 2**62
    assert bits == 40 or capacity * 2 ** (bits + 1) >= 2**62  # the finest that fits


def test_fixed_point_sums_are_exact_and_order_independent():
    """Full memory of exact unit rows: the sums are the integer multiples of 2^40 the rows encode,
    and pushing the same rows in another order gives the same sums."""
    rows = torch.tensor([[1.0, 0.0], [0.0, -1.0], [-1.0, 0.0], [0.6, 0.8]] * 4)
    labels = torch.tensor([0, 0, 1, 1] * 4)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    a, b = ClassMemoryBank(16, 2, 2), ClassMemoryBank(16, 2, 2)
    a.push(rows, labels)
    b.push(rows[order], labels[order])
    one = 2**40
    expected = torch.stack(
        [
            torch.tensor([4 * one, -4 * one]),
            4 * (torch.tensor([-one, 0]) + (torch.tensor([0.6, 0.8]) * 2.0**40).long()),
        ]
    )
    assert torch.equal(a.class_sums, expected) and torch.equal(b.class_sums, expected)
    # a row that leaves subtracts exactly what it added: evicting everything gives 0
    a.push(torch.zeros(16, 2), torch.zeros(16, dtype=torch.long))
    assert not bool(a.class_sums.any())


def test_quantise_truncates_toward_zero_symmetrically(dtype):
    bank = ClassMemoryBank(4, 2, 3)
    rows = torch.tensor([[0.5, -0.25, 3e-13], [-3e-13, 1.0, -1.0]], dtype=dtype)
    step = 2.0**-40
    expected = torch.trunc(rows.double() / step).long()
    assert torch.equal(bank.quantise(rows), expected)
    assert torch.equal(bank.quantise(rows, -1.0), -expected)
    assert torch.equal(bank.quantise(rows, -1.0, torch.float64), -expected.double())


@PATHS
def test_stage_writes_nothing_until_write(sync_free):
    gen = torch.Generator().manual_seed(1)
    bank = ClassMemoryBank(5, 3, 4)
    bank.sync_free_updates = sync_free
    bank.push(*random_pushes(3, 4, (3,), gen, torch.float32, False)[0])
    before = {name: getattr(bank, name).clone() for name in BUFFERS}
    rows, labels, keep = random_pushes(3, 4, (4,), gen, torch.float32, True)[0]
    update = bank.stage(rows, labels, keep)
    assert update is not None
    assert_state(bank, before)
    bank.write(update)
    expected = fifo_reference(
        bank, [(before["embeddings"][:3], before["labels"][:3], None), (rows, labels, keep)]
    )
    assert_state(bank, expected)


def test_stage_with_nothing_kept_is_none_on_the_host_path():
    bank = ClassMemoryBank(5, 3, 4)
    bank.sync_free_updates = False
    assert (
        bank.stage(torch.ones(2, 4) / 2, torch.tensor([0, 1]), torch.zeros(2, dtype=bool)) is None
    )


@PATHS
def test_a_label_out_of_range_raises_in_stage_and_changes_nothing(sync_free):
    bank = ClassMemoryBank(5, 3, 4)
    bank.sync_free_updates = sync_free
    bank.push(torch.eye(4)[:2], torch.tensor([0, 1]))
    before = {name: getattr(bank, name).clone() for name in BUFFERS}
    with pytest.raises((IndexError, RuntimeError)):
        bank.stage(torch.eye(4)[:2], torch.tensor([2, 3]))
    assert_state(bank, before)


def test_check_state_accepts_a_pushed_state_and_names_what_is_wrong():
    bank = ClassMemoryBank(5, 3, 4)
    bank.push(torch.eye(4)[:3], torch.tensor([0, 2, 2]))
    state = {name: getattr(bank, name).clone() for name in BUFFERS}
    bank.check_state(state)
    bad = dict(state, count=torch.tensor(2))
    with pytest.raises(ValueError, match=r"capacity=5.*: count=2 but 3 slots hold an entry"):
        bank.check_state(bad)
    bad = dict(state, class_sums=state["class_sums"] + 1)
    with pytest.raises(ValueError, match="mem_class_sums are not the fixed-point sums"):
        bank.check_state(bad, key_prefix="mem_")
    bad = dict(state, embeddings=state["embeddings"] * 2)
    with pytest.raises(ValueError, match="L2-normalised rows, got a row of norm 2"):
        bank.check_state(bad)


def test_buffers_move_with_the_module_and_are_saved():
    bank = ClassMemoryBank(3, 2, 2).to(torch.float64)
    assert bank.embeddings.dtype == torch.float64 and bank.class_sums.dtype == torch.long
    assert list(bank.state_dict()) == list(BUFFERS)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="capacity"):
        ClassMemoryBank(0, 2, 2)
    with pytest.raises(TypeError, match="num_classes"):
        ClassMemoryBank(3, "2", 2)
