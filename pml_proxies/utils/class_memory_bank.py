"""A FIFO memory of labelled embeddings that keeps exact per-class sums (Proxy-ISA's memory)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..functional.validation import check_int

#: names of the memory's buffers, in registration (and ``state_dict``) order
BUFFERS = ("embeddings", "labels", "write_position", "count", "class_counts", "class_sums")


def fixed_point_bits(capacity: int) -> int:
    """Fraction bits of the int64 per-class sums of a memory of ``capacity`` slots: room for
    ``capacity`` unit vectors without overflow, at most 40 bits (quantisation step 2^-40 per
    coordinate)."""
    return min(40, 62 - int(capacity).bit_length())


class ClassMemoryBank(torch.nn.Module):
    """A ring buffer of the last ``capacity`` labelled, L2-normalised embeddings, with the number
    of entries and the sum of the entries of every class kept up to date as rows come and go
    (what Proxy-ISA needs for its learned similarities, eq. 10; docs/proxy-isa.md).

    Rows are pushed in order, as a sequential FIFO would take them (wrap-around and pushes larger
    than the capacity included). An update is *staged* first (:meth:`stage`: everything that can
    fail, out of place) and *written* after (:meth:`write`: nothing left that can fail), so an
    owner can make a whole training step atomic; :meth:`push` does both.

    **Fixed-point sums.** ``class_sums`` holds ``sum trunc(x * 2^bits)`` per class and coordinate
    in int64, ``bits`` = :func:`fixed_point_bits` (40, fewer for ``capacity >= 2^22`` so that
    ``capacity`` unit vectors cannot overflow). Integer sums are exact and independent of the
    order of the additions: a row that leaves the memory subtracts exactly what it added, the
    sums never drift, and every process of a distributed job holds the same integers. The real
    sum is ``class_sums * 2^-bits``, within ``sqrt(D) 2^-bits`` per entry of the float sum.

    **Two ways of choosing the slots, one bookkeeping.** On CPU the number of pushed rows is read
    on the host (free there) and the rows go to at most two contiguous slices; on other devices a
    host read is a device sync, so fixed-shape index operations choose the slots on the device.
    ``sync_free_updates`` (``None``: by device) forces one; both give the same buffers.

    Args:
        capacity: ``T``, the number of slots, an integer >= 1.
        num_classes: ``C``; labels lie in ``[0, C)``.
        embedding_size: ``D``.

    Buffers (all saved in ``state_dict``; ``.to(dtype)`` changes ``embeddings`` only):
        embeddings: ``(T, D)`` the entries (zero rows in empty slots).
        labels: ``(T,)`` int64, the entries' classes, -1 for an empty slot.
        write_position: ``()`` int64, the slot written next.
        count: ``()`` int64, the number of filled slots (they are ``[0, count)`` until the memory
            is full).
        class_counts: ``(C,)`` int64, entries per class.
        class_sums: ``(C, D)`` int64, the fixed-point sums of the entries per class.
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    write_position: torch.Tensor
    count: torch.Tensor
    class_counts: torch.Tensor
    class_sums: torch.Tensor

    def __init__(self, capacity: int, num_classes: int, embedding_size: int) -> None:
        super().__init__()
        T = self.capacity = check_int("capacity", capacity, low=1)
        C = self.num_classes = check_int("num_classes", num_classes, low=1)
        D = self.embedding_size = check_int("embedding_size", embedding_size, low=1)
        self.fixed_point_bits = fixed_point_bits(T)
        # None: host-side sizes on CPU, fixed-shape (sync-free) updates elsewhere; True/False
        # force one of the two (tests run both)
        self.sync_free_updates: bool | None = None
        # reusable work tensors of the updates (not state; see scratch)
        self._workspace: dict[str, torch.Tensor] = {}
        long = torch.long
        self.register_buffer("embeddings", torch.zeros(T, D))
        self.register_buffer("labels", torch.full((T,), -1, dtype=long))
        self.register_buffer("write_position", torch.zeros((), dtype=long))
        self.register_buffer("count", torch.zeros((), dtype=long))
        self.register_buffer("class_counts", torch.zeros(C, dtype=long))
        self.register_buffer("class_sums", torch.zeros(C, D, dtype=long))

    def extra_repr(self) -> str:
        return (
            f"capacity={self.capacity}, num_classes={self.num_classes}, "
            f"embedding_size={self.embedding_size}, fixed_point_bits={self.fixed_point_bits}"
        )

    # ----------------------------------------------------------------- updates
    @torch.no_grad()
    def push(
        self, entries: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None
    ) -> None:
        """Push the rows of ``entries`` ``(B, D)`` (L2-normalised) with ``labels`` ``(B,)``, only
        those where ``keep`` ``(B,)`` is true if given, in order: :meth:`stage`, then
        :meth:`write`."""
        update = self.stage(entries, labels, keep)
        if update is not None:
            self.write(update)

    def stage(
        self, entries: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None
    ) -> dict | None:
        """The update that pushes the kept rows (in batch order) into the ring buffer, as a
        sequential FIFO would (wrap-around and batches larger than T included), computed
        without writing anything (``None``: nothing to push). Raises on an invalid label before
        any buffer changes.

        The slots are chosen with the sizes read on the host (:meth:`_stage_host_sizes`) or with
        fixed-shape device operations (:meth:`_stage_fixed_shape`), see ``sync_free_updates``;
        either way the rows leaving and entering the slots give the change of the per-class sums
        (:meth:`_stage_sums`)."""
        sync_free = self.sync_free_updates
        if sync_free is None:
            sync_free = entries.device.type != "cpu"
        update: dict | None
        if sync_free:
            update = self._stage_fixed_shape(entries, labels, keep)
        else:
            update = self._stage_host_sizes(entries, labels, keep)
        if update is not None:
            update["sums"] = self._stage_sums(update.pop("removed"), update.pop("added"))
        return update

    def write(self, update: dict) -> None:
        """Write an update from :meth:`stage` (nothing here can fail on an index: all were used
        in staging)."""
        sums = self.class_sums
        if "dense" in update["sums"]:
            sums.add_(update["sums"]["dense"])
        else:
            for index, rows in update["sums"]["rows"]:
                sums.index_put_((index,), rows, accumulate=True)
        for slots, rows, labels in update["writes"]:
            if isinstance(slots, slice):
                self.embeddings[slots].copy_(rows)
                self.labels[slots].copy_(labels)
            else:
                self.embeddings.index_copy_(0, slots, rows)
                self.labels.index_copy_(0, slots, labels)
        self.class_counts.copy_(update["class_counts"])
        for buffer, value in ((self.write_position, update["write_position"]),
                              (self.count, update["count"])):  # fmt: skip
            # a host value (host-sizes path) or a device tensor (fixed-shape path)
            if isinstance(value, int):
                buffer.fill_(value)
            else:
                buffer.copy_(value)

    # ----------------------------------------------------------------- fixed point
    def quantise(self, rows: torch.Tensor, sign: float = 1.0, dtype=torch.long) -> torch.Tensor:
        """``sign * rows`` in fixed point, ``trunc(sign * rows * 2^bits)``: scaling by a power of
        two is exact and the truncation is toward zero, so a memory row always gives the same
        integers (and ``sign = -1`` exactly their negatives). ``dtype``: int64 (the sums' format)
        or float64 (the same integers, exact there as well: their magnitude is below 2^53; the
        result is then a work tensor, valid until the next call)."""
        if dtype == torch.long:
            return (rows * (sign * 2.0**self.fixed_point_bits)).long()
        # one pass: rows / (sign * 2^-bits) is exact as well, truncated toward zero
        step = sign * 2.0**-self.fixed_point_bits
        out = self.scratch("quantised", rows.shape, dtype, rows.device)
        if rows.dtype == dtype:
            return torch.div(rows, step, rounding_mode="trunc", out=out)
        scaled = self.scratch("scaled", rows.shape, rows.dtype, rows.device)
        return out.copy_(torch.div(rows, step, rounding_mode="trunc", out=scaled))

    def scratch(self, name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A work tensor, reused from call to call under ``name`` (contents undefined): on CPU,
        allocating large temporaries anew every step costs page faults that took as long as the
        arithmetic. Not state: never saved, rebuilt on another device or dtype."""
        view = self._workspace.get(name)
        if view is not None and (view.shape, view.dtype, view.device) == (shape, dtype, device):
            return view  # the steady state: no new tensor, not even a view
        storage = self._workspace.get(name + ".storage")
        numel = math.prod(shape)
        if storage is None or storage.dtype != dtype or storage.device != device:
            storage = None
        if storage is None or storage.numel() < numel:
            storage = torch.empty(numel, dtype=dtype, device=device)
            self._workspace[name + ".storage"] = storage
        view = self._workspace[name] = storage[:numel].view(shape)
        return view

    def _dense_sum_changes(self, rewritten: int) -> bool:
        """Whether an update that rewrites ``rewritten`` slots accumulates the change of the
        per-class sums in a dense ``(C, D)`` float64 buffer (few classes: cheaper) rather than
        row by row into the int64 sums (many classes).

        Both give the same integers: an update's change of a class coordinate is a sum of at most
        ``2 * rewritten`` fixed-point values, each an integer of magnitude at most
        ``2^(bits + 1)`` (memory rows are L2-normalised, so ``|x_d| <= 1`` up to rounding;
        :meth:`check_state` rejects rows of norm above 1.01); with
        ``rewritten <= 2^(51 - bits)`` every partial sum is an integer of magnitude at most
        2^53, exact in float64 in any order."""
        return self.num_classes <= 2 * rewritten and rewritten <= 2 ** (51 - self.fixed_point_bits)

    # ----------------------------------------------------------------- staging
    def _stage_sums(self, removed: list, added: list) -> dict:
        """The change of ``class_sums`` when the ``removed`` rows leave and the ``added`` rows
        enter the memory (lists of ``(class index, rows)``; an empty slot counts as a zero row of
        class 0): summed per class into a dense int64 ``(C, D)`` change (``"dense"``, exact
        through float64, see :meth:`_dense_sum_changes`), or as fixed-point int64 rows with their
        classes (``"rows"``), added to the sums when written."""
        changes = [(index, rows, -1.0) for index, rows in removed]
        changes += [(index, rows, 1.0) for index, rows in added]
        if not self._dense_sum_changes(sum(index.shape[0] for index, _ in added)):
            return {"rows": [(index, self.quantise(rows, sign)) for index, rows, sign in changes]}
        sums = self.class_sums
        dense = self.scratch("dense", sums.shape, torch.float64, sums.device).zero_()
        for index, rows, sign in changes:
            dense.index_add_(0, index, self.quantise(rows, sign, torch.float64))
        return {"dense": self.scratch("change", sums.shape, sums.dtype, sums.device).copy_(dense)}

    def _stage_host_sizes(self, entries, labels, keep) -> dict | None:
        """:meth:`stage` with the sizes read on the host: the kept rows go to at most two
        contiguous slices; since a consistent memory holds its entries in slots
        ``[0, count)``, only the slots below the count lose a row."""
        T = self.capacity
        if keep is not None:
            kept = keep.nonzero().squeeze(1)
            if kept.shape[0] < labels.shape[0]:
                entries, labels = entries.index_select(0, kept), labels.index_select(0, kept)
        pushed = entries.shape[0]
        if pushed == 0:
            return None
        position, count = int(self.write_position), int(self.count)
        start = position
        if pushed > T:  # only the last T rows survive, from slot position + pushed - T on
            entries, labels = entries[pushed - T :], labels[pushed - T :]
            start = (position + pushed - T) % T
        n = entries.shape[0]
        rows = entries.to(self.embeddings.dtype)
        first = min(n, T - start)
        slices = [slice(start, start + first)] + ([slice(0, n - first)] if first < n else [])
        writes, removed, offset = [], [], 0
        for slots in slices:
            length = slots.stop - slots.start
            part = slice(offset, offset + length)
            writes.append((slots, rows[part], labels[part]))
            filled = slice(slots.start, min(slots.stop, count))
            if filled.start < filled.stop:
                removed.append((self.labels[filled], self.embeddings[filled]))
            offset += length
        ones = torch.ones_like(labels)
        class_counts = self.class_counts.index_add(0, labels, ones)
        for index, _ in removed:
            class_counts.index_add_(0, index, ones[: index.shape[0]], alpha=-1)
        return {
            "writes": writes,
            "removed": removed,
            "added": [(labels, rows)],
            "class_counts": class_counts,
            "write_position": (position + pushed) % T,
            "count": min(count + pushed, T),
        }

    def _stage_fixed_shape(self, entries, labels, keep) -> dict:
        """The slots of :meth:`stage` chosen with fixed-shape device operations (no host sync):
        ``L = min(B, T)`` slots from the write position on are rewritten, each with the last kept
        row that a sequential FIFO would leave there, or with its own old content when fewer
        than ``L`` rows were kept (unchanged slots cancel exactly in the per-class sums; label -1
        marks a slot that stays empty, its row is zero)."""
        T, B = self.capacity, entries.shape[0]
        L = min(B, T)
        device = entries.device
        if keep is None:
            order = torch.arange(B, device=device)
            # torch.full, not torch.tensor: a host value copied to CUDA is a blocking H2D copy
            n_keep = torch.full((), B, dtype=torch.long, device=device)
        else:
            # kept rows first, in batch order
            order = torch.sort((~keep).to(torch.int8), stable=True).indices
            n_keep = keep.sum()
        j = torch.arange(L, device=device)
        valid = j < n_keep
        # the last kept rank r < n_keep with r = j (mod T) ends up in slot ptr + j
        rank = j + T * torch.div((n_keep - 1 - j).clamp(min=0), T, rounding_mode="floor")
        src = order.index_select(0, rank.clamp(max=B - 1))
        slots = (self.write_position + j) % T
        old_rows = self.embeddings.index_select(0, slots)
        old_labels = self.labels.index_select(0, slots)
        new_rows = entries.index_select(0, src).to(old_rows.dtype)
        rows = torch.where(valid.unsqueeze(1), new_rows, old_rows)
        new_labels = torch.where(valid, labels.index_select(0, src), old_labels)
        old_index, new_index = old_labels.clamp(min=0), new_labels.clamp(min=0)
        class_counts = self.class_counts.index_put(
            (old_index,), -(old_labels >= 0).long(), accumulate=True
        ).index_put_((new_index,), (new_labels >= 0).long(), accumulate=True)
        return {
            "writes": [(slots, rows, new_labels)],
            "removed": [(old_index, old_rows)],
            "added": [(new_index, rows)],
            "class_counts": class_counts,
            "write_position": (self.write_position + n_keep) % T,
            "count": (self.count + n_keep).clamp(max=T),
        }

    # ----------------------------------------------------------------- state check
    def check_state(
        self,
        state: dict[str, torch.Tensor],
        key_prefix: str = "",
        fail: Callable[[str], None] | None = None,
    ) -> None:
        """Raise ``ValueError`` unless ``state`` (buffer name -> tensor, each of the buffer's
        shape, finite and integral where the buffer is: what ``load_state_dict`` would write) is
        a consistent state of this memory: :meth:`check_layout`, then :meth:`check_rows`.
        Messages name the buffers as ``key_prefix + name``; ``fail`` (which must raise) replaces
        the default ``ValueError``."""
        if fail is None:
            fail = self._fail
        self.check_layout(state, key_prefix, fail)
        self.check_rows(state, key_prefix, fail)

    def _fail(self, message: str) -> None:
        raise ValueError(
            f"invalid {type(self).__name__} state for capacity={self.capacity}, "
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}: {message}"
        )

    def check_layout(
        self, state: dict[str, torch.Tensor], key_prefix: str, fail: Callable[[str], None]
    ) -> None:
        """The bookkeeping part of :meth:`check_state`: labels in ``[-1, C)``, ``count`` equal
        to the filled slots, ``write_position`` in ``[0, T)`` (and equal to the count while the
        memory is not full, its entries in slots ``[0, count)``), ``class_counts`` equal to a
        recount of the labels."""
        C, T = self.num_classes, self.capacity
        key = {name: key_prefix + name for name in BUFFERS}

        def get(name: str) -> torch.Tensor:
            return state[name].detach().to("cpu")

        labels = get("labels").long()
        if T and (int(labels.min()) < -1 or int(labels.max()) >= C):
            fail(
                f"{key['labels']} must lie in [-1, {C}) (-1: empty slot), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        filled = labels >= 0
        count, position = int(get("count")), int(get("write_position"))
        if count != int(filled.sum()):
            fail(f"{key['count']}={count} but {int(filled.sum())} slots hold an entry")
        if not 0 <= position < T:
            fail(f"{key['write_position']} must lie in [0, {T}), got {position}")
        if count < T and (position != count or not bool(filled[:count].all())):
            fail(
                f"a memory that is not full holds slots 0 .. {key['count']} - 1 and writes next "
                f"at slot {key['count']}"
            )
        if not torch.equal(get("class_counts").long(), torch.bincount(labels[filled], minlength=C)):
            fail(f"{key['class_counts']} do not count the entries of {key['labels']}")

    def check_rows(
        self, state: dict[str, torch.Tensor], key_prefix: str, fail: Callable[[str], None]
    ) -> None:
        """The part of :meth:`check_state` on the rows and their sums (after
        :meth:`check_layout`): empty slots hold zero rows, rows of L2 norm at most 1.01, ``class_sums`` the
        fixed-point sums of the entries."""
        C, D, T = self.num_classes, self.embedding_size, self.capacity
        labels = state["labels"].detach().to("cpu").long()
        rows = state["embeddings"].detach().to("cpu").to(self.embeddings.dtype)
        if bool((rows[labels < 0] != 0).any()):
            fail("empty memory slots (label -1) must hold zero rows")
        # the memory holds L2-normalised embeddings (what keeps the float64 accumulation of the
        # per-class sums exact, see _dense_sum_changes); 1.01 leaves room for rounding
        largest = float(torch.linalg.vector_norm(rows.double(), dim=1).max()) if T else 0.0
        if largest > 1.01:
            fail(
                f"{key_prefix}embeddings must hold L2-normalised rows, got a row of norm "
                f"{largest:.4g}"
            )
        sums = torch.zeros(C, D, dtype=torch.long)
        for start in range(0, T, 4096):  # chunks: no (T, D) int64 temporary
            chunk = slice(start, start + 4096)
            index = (labels[chunk].clamp(min=0),)
            sums.index_put_(index, self.quantise(rows[chunk]), accumulate=True)
        if not torch.equal(state["class_sums"].detach().to("cpu").long(), sums):
            fail(
                f"{key_prefix}class_sums are not the fixed-point sums of the memory's entries per "
                "class"
            )
