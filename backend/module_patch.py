"""Swapping a module's class for a subclass with another forward, and per-context sinks for what it records.

The machinery under ``sam_attention`` and ``decoder_attention``: a patched module stays an instance of
its stock class (parameters, ``state_dict``, ``isinstance`` unchanged), and a forward finds where to
record through a ``ContextVar`` map, replaced (never mutated) on entry, so two threads or asyncio tasks
never see each other's captures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import TypeVar, cast

from torch import nn

_Sink = TypeVar("_Sink")

# One subclass per (stock class, patch), so a patched module stays an instance of its stock class and
# repeated patching yields the same type (setdefault keeps the first one made if two threads race).
_PATCHED_CLASSES: dict[tuple[type[nn.Module], type[ForwardPatch]], type[nn.Module]] = {}


def _patched_class(stock: type[nn.Module], patch: type[ForwardPatch]) -> type[nn.Module]:
    cls = _PATCHED_CLASSES.get((stock, patch))
    if cls is None:
        made = type(
            f"{patch.__name__.lstrip('_')}[{stock.__name__}]",
            (patch, stock),
            {"_stock_class": stock, "_patch_class": patch, "__module__": __name__},
        )
        # type() is typed as returning a plain `type`; this one subclasses ``stock``.
        cls = _PATCHED_CLASSES.setdefault((stock, patch), cast("type[nn.Module]", made))
    return cls


def _new_patched(stock: type[nn.Module], patch: type[ForwardPatch]) -> nn.Module:
    cls = _patched_class(stock, patch)
    return cls.__new__(cls)


class ForwardPatch:
    """Base of the forward patches: pickles/deep-copies as stock class + patch (no dynamic names)."""

    _stock_class: type[nn.Module]
    _patch_class: type[ForwardPatch]

    def __reduce__(self):
        return (_new_patched, (self._stock_class, self._patch_class), self.__getstate__())


def swap_in(module: nn.Module, patch: type[ForwardPatch]) -> None:
    """Make ``module`` run ``patch``'s forward (its class becomes the patched subclass of its stock class)."""
    stock: type[nn.Module] = getattr(type(module), "_stock_class", type(module))
    module.__class__ = _patched_class(stock, patch)


def swap_out(module: nn.Module) -> None:
    """Give ``module`` its stock class back (no-op when it is not patched)."""
    stock = getattr(type(module), "_stock_class", None)
    if stock is not None:
        module.__class__ = stock


@contextlib.contextmanager
def sinks_active(active: ContextVar[Mapping[object, _Sink]], sinks: Mapping[object, _Sink]) -> Iterator[None]:
    """Within the block, ``active`` (this context's module -> sink map) also holds ``sinks``."""
    token = active.set(MappingProxyType({**active.get(), **sinks}))
    try:
        yield
    finally:
        active.reset(token)
