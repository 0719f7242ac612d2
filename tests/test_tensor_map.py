"""TensorMap (torch_handler/ops/interception/tensor_map.py): keys by identity, never kept alive,
and a dead key's id reused by a new tensor never finds the old value."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from torch_handler.ops.interception.tensor_map import TensorMap


def test_keys_are_tensors_by_identity():
    a, b = torch.zeros(3), torch.zeros(3)  # equal values, two keys
    m = TensorMap()
    m[a] = "a"
    assert m.get(a) == "a" and m[a] == "a" and a in m
    assert m.get(b) is None and m.get(b, 7) == 7 and b not in m
    with pytest.raises(KeyError, match="not in this map"):
        m[b]
    m[a] = "again"
    assert m[a] == "again"


def test_a_key_is_not_kept_alive_and_its_entry_leaves():
    m = TensorMap()
    t = torch.ones(2)
    alive = weakref.ref(t)
    m[t] = 1
    del t
    gc.collect()
    assert alive() is None and m._data == {}


def test_a_reused_id_does_not_find_the_dead_keys_value():
    """An entry whose id a new tensor now has (its old key died, its removal not yet run) holds
    a reference to the old key, not to the new tensor: not found."""
    m = TensorMap()
    old, new = torch.ones(2), torch.ones(2)
    m[old] = "old"
    m._data[id(new)] = m._data.pop(id(old))  # the id reused: the same entry under new's id
    del old
    gc.collect()
    assert m.get(new) is None and new not in m
    m[new] = "new"
    assert m[new] == "new"
