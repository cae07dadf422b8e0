"""ProxyISALoss's state update, bit for bit against the straightforward per-row computation.

The loss accumulates a step's change of the int64 fixed-point per-class sums of its memory in
float64 when there are few classes (a dense ``(C, D)`` change) and row by row in int64 when there
are many. The reference here is the plain sequential computation: a FIFO loop over the kept rows
that subtracts each evicted row and adds each pushed row as int64 fixed point, followed by the
learned-similarity estimate as the loss computed it before the dense path existed. Both must give
identical int64 sums, counters, learned similarities, losses and gradients (``torch.equal``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pml_proxies.losses import ProxyISALoss

# small V and large h: the filter marks outliers, the weights move
CONFIG = dict(volume_bound=4.0, hardness_scale=0.5, memory_start_epoch=1, filter_start_epoch=1)


class PerRowISA(ProxyISALoss):
    """ProxyISALoss whose state update is the straightforward per-row int64 computation."""

    @torch.no_grad()
    def _commit(self, entries, labels, outliers, proxies) -> None:
        kept = [i for i in range(labels.shape[0]) if outliers is None or not bool(outliers[i])]
        for i in kept:
            self.sample_counts[labels[i]] += 1
        beta = (self.volume_bound - 1.0) / self.volume_bound
        power = torch.pow(beta, self.sample_counts.double())
        self.effective_numbers.copy_(power.neg_().add_(1.0).div_(1.0 - beta))
        if not self._memory_on:
            return
        T, scale = self.memory_size, 2.0**self.fixed_point_bits
        for i in kept:
            slot = int(self.memory_write_position)
            old = int(self.memory_labels[slot])
            if old >= 0:
                row = self.memory_embeddings[slot]
                self.memory_class_sums[old] -= (row * scale).long()
                self.memory_class_counts[old] -= 1
            row = entries[i].to(self.memory_embeddings.dtype)
            new = int(labels[i])
            self.memory_embeddings[slot] = row
            self.memory_labels[slot] = new
            self.memory_class_sums[new] += (row * scale).long()
            self.memory_class_counts[new] += 1
            self.memory_write_position.fill_((slot + 1) % T)
            self.memory_count.fill_(min(int(self.memory_count) + 1, T))
        self._reference_learned_similarities(labels, proxies)

    def _reference_learned_similarities(self, labels, proxies) -> None:
        # the estimate as computed before the dense path (same float operations, same order)
        scale = self.hardness_scale * 2.0**-self.fixed_point_bits
        if self.num_classes <= labels.shape[0]:
            counts = self.memory_class_counts
            dots = (self.memory_class_sums.to(proxies.dtype) * proxies).sum(1)
            present = torch.zeros_like(counts, dtype=torch.bool).index_fill_(0, labels, True)
            current = self.learned_similarities
            estimate = (dots * scale / counts.clamp(min=1)).to(current.dtype)
            current.copy_(torch.where(present & (counts > 0), estimate, current))
            return
        counts = self.memory_class_counts.index_select(0, labels)
        sums = self.memory_class_sums.index_select(0, labels).to(proxies.dtype)
        dots = (sums * proxies.index_select(0, labels)).sum(1)
        current = self.learned_similarities.index_select(0, labels)
        estimate = (dots * scale / counts.clamp(min=1)).to(current.dtype)
        updated = torch.where(counts > 0, estimate, current)
        self.learned_similarities.index_put_((labels,), updated)


def random_state(loss: ProxyISALoss, fill: int, gen: torch.Generator) -> dict:
    """A consistent random state: ``fill`` memory entries (unit rows, random classes; a full
    memory gets a random write position), sums and counts recounted row by row, counters and
    learned similarities as after a while."""
    C, D, T = loss.num_classes, loss.embedding_size, loss.memory_size
    dtype = loss.memory_embeddings.dtype
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    rows = F.normalize(torch.randn(fill, D, generator=gen, dtype=torch.float64), dim=1)
    rows[: fill // 4, 1:] = 0  # exact unit rows: coordinates +-1, the largest fixed-point values
    rows[: fill // 4, 0] = torch.where(torch.rand(fill // 4, generator=gen) < 0.5, -1.0, 1.0)
    labels = torch.randint(0, C, (fill,), generator=gen)
    state["memory_embeddings"][:fill] = rows.to(dtype)
    state["memory_labels"][:fill] = labels
    state["memory_count"].fill_(fill)
    position = int(torch.randint(0, T, (), generator=gen)) if fill == T else fill
    state["memory_write_position"].fill_(position)
    sums, counts = state["memory_class_sums"].zero_(), state["memory_class_counts"].zero_()
    for t in range(fill):
        sums[labels[t]] += (state["memory_embeddings"][t] * 2.0**loss.fixed_point_bits).long()
        counts[labels[t]] += 1
    n = torch.randint(0, 12, (C,), generator=gen)
    state["sample_counts"].copy_(n)
    beta = (loss.volume_bound - 1.0) / loss.volume_bound
    state["effective_numbers"].copy_((1 - beta ** n.double()) / (1 - beta))
    state["learned_similarities"].copy_(0.5 * torch.rand(C, generator=gen, dtype=torch.float64))
    return state


def spy_dense_choices(monkeypatch, loss) -> list:
    choices = []
    choose = loss.memory._dense_sum_changes

    def spy(rewritten):
        choices.append(choose(rewritten))
        return choices[-1]

    monkeypatch.setattr(loss.memory, "_dense_sum_changes", spy)
    return choices


# (C, D, T, batch sizes, fill of the starting memory, accumulation paths that must occur:
# True = dense float64 change, False = per-row int64)
CASES = {
    "few_classes": (3, 5, 7, (4, 9, 16, 2), 7, {True}),  # dense; batches > T; full memory
    "many_classes": (40, 4, 30, (5, 12, 3), 30, {False}),  # per row
    "both_paths": (40, 4, 30, (5, 45, 12, 31), 11, {True, False}),  # 45 > T: dense
    "more_classes_than_batch": (12, 3, 9, (5, 4, 20), 0, {True, False}),  # C > B estimate
}


@pytest.mark.parametrize("sync_free", [False, True], ids=["host_sizes", "fixed_shape"])
@pytest.mark.parametrize("case", list(CASES))
def test_state_update_equals_per_row_reference_bit_for_bit(case, sync_free, dtype, monkeypatch):
    C, D, T, sizes, fill, paths = CASES[case]
    torch.manual_seed(0)
    loss = ProxyISALoss(C, D, memory_size=T, **CONFIG).to(dtype)
    reference = PerRowISA(C, D, memory_size=T, **CONFIG).to(dtype)
    loss.sync_free_memory_updates = reference.sync_free_memory_updates = sync_free
    gen = torch.Generator().manual_seed(1)
    state = random_state(loss, fill, gen)
    loss.load_state_dict(state)
    reference.load_state_dict(state)
    choices = spy_dense_choices(monkeypatch, loss)
    outliers = wrapped = 0
    for step in range(12):
        B = sizes[step % len(sizes)]
        X = torch.randn(B, D, generator=gen, dtype=torch.float64)
        # tiny coordinates, below the float32 spacing at 2^-17: their truncation matters
        X[:, 0] = X[:, 0] * 10.0 ** -torch.randint(5, 14, (B,), generator=gen)
        X = X.to(dtype)
        y = torch.randint(0, C, (B,), generator=gen)
        n_before, position = (
            int(reference.sample_counts.sum()),
            int(reference.memory_write_position),
        )
        results = []
        for model in (loss, reference):
            X1 = X.clone().requires_grad_(True)
            model.proxies.grad = None
            value = model(X1, y)
            value.backward()
            results.append((value.detach(), X1.grad, model.proxies.grad.clone()))
        for got, expected in zip(*results):
            assert torch.equal(got, expected), f"loss or gradient differs at step {step}"
        for (name, got), (_, expected) in zip(loss.named_buffers(), reference.named_buffers()):
            assert torch.equal(got, expected), f"{name} differs at step {step}"
        kept = int(reference.sample_counts.sum()) - n_before
        outliers += B - kept
        wrapped += int(reference.memory_write_position) < position + kept
        with torch.no_grad():  # move the proxies, as training would
            for model in (loss, reference):
                model.proxies.sub_(0.3 * results[0][2])
    assert outliers > 0 and wrapped > 0
    assert paths <= set(choices)


def test_largest_dense_step_is_exact(monkeypatch):
    """The bound of the dense path: 2^(51 - bits) rewritten slots, every evicted and pushed row
    an exact +-1 unit vector of one class (each fixed-point value 2^40, partial sums up to 2^51),
    then one slot more (per-row path); both equal the reference."""
    T = 4096
    for rewritten, dense in ((2048, True), (2049, False)):
        kwargs = dict(memory_size=T, memory_start_epoch=1, filter_start_epoch=99)
        loss, reference = ProxyISALoss(2, 2, **kwargs), PerRowISA(2, 2, **kwargs)
        assert 2 ** (51 - loss.fixed_point_bits) == 2048
        state = {k: v.clone() for k, v in loss.state_dict().items()}
        state["memory_embeddings"][:, 0] = 1.0
        state["memory_labels"].zero_()
        state["memory_count"].fill_(T)
        state["memory_class_counts"][0] = T
        state["memory_class_sums"][0, 0] = T * 2**40
        for model in (loss, reference):
            model.load_state_dict(state)
        choices = spy_dense_choices(monkeypatch, loss)
        X = torch.zeros(rewritten, 2)
        X[:, 0] = -3.0  # normalised: exactly -1
        y = torch.zeros(rewritten, dtype=torch.long)
        y[::2] = 1
        for model in (loss, reference):
            model(X, y)
        assert choices == [dense]
        for (name, got), (_, expected) in zip(loss.named_buffers(), reference.named_buffers()):
            assert torch.equal(got, expected), name
        assert int(loss.memory_class_sums[0, 0]) == (T - rewritten) * 2**40 - rewritten // 2 * 2**40


def test_loading_rows_that_are_not_normalised_raises():
    loss = ProxyISALoss(3, 4, memory_size=5, **CONFIG)
    loss(torch.randn(4, 4), torch.tensor([0, 1, 2, 2]))
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    state["memory_embeddings"][1] *= 2.0
    slot_class = int(state["memory_labels"][1])
    state["memory_class_sums"].zero_().index_put_(
        (state["memory_labels"].clamp(min=0),),
        loss.memory.quantise(state["memory_embeddings"]),
        accumulate=True,
    )
    assert slot_class >= 0
    fresh = ProxyISALoss(3, 4, memory_size=5, **CONFIG)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="L2-normalised rows, got a row of norm 2"):
        fresh.load_state_dict(state)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k
