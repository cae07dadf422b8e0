"""ProxyISALoss's ``state_dict`` keeps its format now that its memory is a
:class:`~pml_proxies.utils.class_memory_bank.ClassMemoryBank` submodule: the same flat keys in the
same order, dtypes and shapes, and states saved before (pml-proxies 0.2.0) load and resume.

``STATE_0_2_0`` is ``trained_state()`` below as the code of commit 73294c6 (before the memory
had a class of its own) returned it, written out value by value (float32 values as the exact
doubles they convert to).
"""

from __future__ import annotations

import pytest
import torch

from pml_proxies.losses import ProxyISALoss

#: key: (dtype, shape, values), in the order of the 0.2.0 state_dict
STATE_0_2_0 = {
    "proxies": (
        torch.float32,
        (3, 4),
        [
            1.2582180500030518,
            -0.23958370089530945,
            -1.7789740562438965,
            0.4641222059726715,
            -0.8855087757110596,
            -1.1419483423233032,
            0.32933130860328674,
            0.6842456459999084,
            -0.5872713327407837,
            -0.32932859659194946,
            -0.48715072870254517,
            0.14863216876983643,
        ],
    ),
    "epoch": (torch.long, (), [3]),
    "memory_enabled": (torch.bool, (), [True]),
    "filter_enabled": (torch.bool, (), [True]),
    "sample_counts": (torch.long, (3,), [4, 4, 3]),
    "effective_numbers": (torch.float32, (3,), [2.734375, 2.734375, 2.3125]),
    "learned_similarities": (
        torch.float32,
        (3,),
        [0.19453324377536774, -0.15835966169834137, -0.05265045166015625],
    ),
    "memory_embeddings": (
        torch.float32,
        (5, 4),
        [
            0.0,
            0.6000000238418579,
            -0.800000011920929,
            0.0,
            0.0,
            0.0,
            0.6000000238418579,
            -0.800000011920929,
            0.0,
            0.0,
            0.0,
            1.0,
            0.0,
            0.0,
            0.0,
            -1.0,
            0.6000000238418579,
            -0.800000011920929,
            0.0,
            0.0,
        ],
    ),
    "memory_labels": (torch.long, (5,), [0, 1, 0, 1, 2]),
    "memory_write_position": (torch.long, (), [2]),
    "memory_count": (torch.long, (), [5]),
    "memory_class_counts": (torch.long, (3,), [2, 2, 1]),
    "memory_class_sums": (
        torch.long,
        (3, 4),
        [
            0,
            659707002880,
            -879609315328,
            1099511627776,
            0,
            0,
            659707002880,
            -1979120943104,
            659707002880,
            -879609315328,
            0,
            0,
        ],
    ),
}
KEYS_0_2_0 = list(STATE_0_2_0)


def make_loss() -> ProxyISALoss:
    return ProxyISALoss(
        3,
        4,
        memory_size=5,
        memory_start_epoch=2,
        filter_start_epoch=3,
        volume_bound=4.0,
        hardness_scale=0.5,
    )


def exact_unit_rows() -> torch.Tensor:
    """Rows whose L2 normalisation is exact on any CPU: ``+-2 e_k`` and ``(3, -4)`` (norm 5)."""
    rows = []
    for k in range(4):
        for sign in (1.0, -1.0):
            row = torch.zeros(4)
            row[k] = sign * 2.0
            rows.append(row)
    for k in range(3):
        row = torch.zeros(4)
        row[k], row[k + 1] = 3.0, -4.0
        rows.append(row)
    return torch.stack(rows)


def trained_state() -> dict:
    """Three steps: epoch 1 (counters only), epoch 2 (memory on; 7 pushes into 5 slots, so the
    ring buffer wraps), then epoch 3 starts (filter on)."""
    torch.manual_seed(0)
    loss = make_loss()
    rows = exact_unit_rows()
    labels = torch.arange(rows.shape[0]) % 3
    loss(rows[:4], labels[:4])
    loss.set_epoch(2)
    loss(rows[4:8], labels[4:8])
    loss(rows[8:], labels[8:])
    loss.set_epoch(3)
    return loss.state_dict()


def saved_state() -> dict:
    return {
        key: torch.tensor(values, dtype=dtype).reshape(shape)
        for key, (dtype, shape, values) in STATE_0_2_0.items()
    }


def test_state_dict_has_the_keys_dtypes_and_shapes_of_0_2_0():
    saved, state = saved_state(), trained_state()
    assert KEYS_0_2_0[0] == "proxies" and KEYS_0_2_0[-1] == "memory_class_sums"
    assert list(state) == KEYS_0_2_0
    assert list(make_loss().state_dict()) == KEYS_0_2_0
    for key, value in state.items():
        assert (value.dtype, value.shape) == (saved[key].dtype, saved[key].shape), key


def test_state_dict_has_the_values_of_0_2_0():
    """The same steps give the same state as 0.2.0's code did. The memory rows and their
    fixed-point sums are exact by construction (exactly normalisable rows), so every integer and
    boolean buffer must be equal; the float buffers come from the same operations, but another
    CPU may round a float32 dot product or power differently: a few ulps (1e-6 relative)."""
    saved, state = saved_state(), trained_state()
    for key, value in state.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, saved[key], rtol=1e-6, atol=1e-7, msg=key)
        else:
            assert torch.equal(value, saved[key]), key
    assert int(state["memory_count"]) == 5 and int(state["memory_write_position"]) == 2


def test_a_0_2_0_state_loads_and_resumes():
    saved = saved_state()
    loss = make_loss()
    loss.load_state_dict(saved)
    for key, value in loss.state_dict().items():  # loading copies: bit for bit
        assert torch.equal(value, saved[key]), key
    assert loss.memory.count is loss.memory_count and int(loss.memory.count) == 5
    assert (loss.epoch.item(), loss._memory_on, loss._filter_on) == (3, True, True)
    # training goes on from the loaded state: the kept rows enter the wrapped ring buffer
    x, y = exact_unit_rows()[:6], torch.tensor([0, 1, 2, 0, 1, 2])
    loss(x, y)
    kept = int(loss.sample_counts.sum() - saved["sample_counts"].sum())
    assert int(loss.memory_write_position) == (2 + kept) % 5 and int(loss.memory_count) == 5
    loss._check_state(dict(loss.state_dict()))  # the bookkeeping matches a recount


def test_a_corrupted_0_2_0_state_is_rejected_naming_its_key():
    saved = saved_state()
    saved["memory_class_counts"][0] += 1
    loss = make_loss()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    with pytest.raises(ValueError, match="memory_class_counts do not count the entries of memory"):
        loss.load_state_dict(saved)
    for key, value in loss.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_the_submodule_keys_are_not_a_state():
    """The memory's buffers are saved under their flat keys only; ``memory.<name>`` keys are
    not accepted by a strict load."""
    loss = make_loss()
    nested = {k.replace("memory_", "memory.", 1): v for k, v in saved_state().items()}
    nested["memory_enabled"] = nested.pop("memory.enabled")
    with pytest.raises(ValueError, match="missing keys"):
        loss.load_state_dict(nested)


def test_partial_load_checks_against_the_current_memory():
    """strict=False: a memory key given alone is checked together with the current buffers."""
    loss = make_loss()
    with pytest.raises(ValueError, match="memory_count=1 but 0 slots hold an entry"):
        loss.load_state_dict({"memory_count": torch.tensor(1)}, strict=False)
    loss.load_state_dict({"memory_write_position": torch.tensor(0)}, strict=False)
