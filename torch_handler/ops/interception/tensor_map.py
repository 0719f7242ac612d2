"""A map keyed by tensors' identity that does not keep its keys alive."""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor

_ABSENT = object()


class TensorMap:
    """``t -> value`` by identity, not keeping ``t`` alive: the part of torch's
    ``WeakTensorKeyDictionary`` the interception uses (``m[t] = v``, ``m[t]``, ``m.get(t)``,
    ``t in m``).

    Why not that class: it makes a weak reference for every lookup, and the interception looks
    tensors up several times per op (over 250 lookups per forward of a GRU + MultiheadAttention
    model, about 0.5 ms of a 5 ms forward on the 2-core VM). Here a lookup is a dict lookup by
    ``id`` and one call of the reference stored with it; the reference tells a live key from a
    dead one whose ``id`` a new tensor reuses. An entry leaves the map when its tensor dies.
    """

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[int, tuple[weakref.ref, Any]] = {}

    def __setitem__(self, t: Tensor, value: Any) -> None:
        key, data = id(t), self._data

        def forget(ref: weakref.ref, key: int = key) -> None:
            if data.get(key, (None,))[0] is ref:
                data.pop(key, None)

        data[key] = (weakref.ref(t, forget), value)

    def get(self, t: Tensor, default: Any = None) -> Any:
        entry = self._data.get(id(t))
        return default if entry is None or entry[0]() is not t else entry[1]

    def __getitem__(self, t: Tensor) -> Any:
        value = self.get(t, _ABSENT)
        if value is _ABSENT:
            raise KeyError(f"tensor of shape {tuple(t.shape)} not in this map")
        return value

    def __contains__(self, t: Tensor) -> bool:
        return self.get(t, _ABSENT) is not _ABSENT
