"""A CPU stand-in for CUDA's sync debug mode: which reads of device values would make the host wait.

On a GPU, a value computed on the device reaches Python only by waiting for the device to finish:
``.item()``, ``float()``, ``bool()`` (a data-dependent ``if``), ``.tolist()``, ``.cpu()``, ``nonzero``.
On a CPU nothing waits, so :class:`HostReads` tracks what *would* live on the device: the tensors it
is given (the model's parameters and buffers, the step's inputs) and everything computed from them.
Host values (a CPU generator's draws, indices, Python numbers) pass freely, as they do on a GPU.
"""
from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
# Ops whose result the host must see before it can go on (a value, or an output shape).
READ_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default,
            aten.is_nonzero.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}
# Tensor methods that copy to the host without dispatching an op on a CPU tensor.
READ_METHODS = ("cpu", "tolist", "numpy")


class HostReads(TorchDispatchMode):
    """Records (or with ``strict``, refuses) every host read of a device value while active."""

    def __init__(self, device_tensors: Iterable[torch.Tensor], strict: bool = True) -> None:
        super().__init__()
        self.strict = strict
        self.reads: list[str] = []
        self._device: dict[int, weakref.ref] = {}
        self._methods: dict[str, object] = {}
        for tensor in device_tensors:
            self._mark(tensor)

    def _mark(self, tensor: torch.Tensor) -> None:
        self._device[id(tensor)] = weakref.ref(tensor)

    def on_device(self, tensor: object) -> bool:
        if not isinstance(tensor, torch.Tensor):
            return False
        ref = self._device.get(id(tensor))
        return ref is not None and ref() is tensor

    def _read(self, what: str) -> None:
        self.reads.append(what)
        if self.strict:
            raise AssertionError(f"host read of a device value: {what}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_device = any(self.on_device(leaf) for leaf in tree_leaves((args, kwargs)))
        if on_device and func in READ_OPS:
            self._read(str(func))
        out = func(*args, **kwargs)
        if on_device:
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self._mark(leaf)
        return out

    def __enter__(self):
        for name in READ_METHODS:
            original = getattr(torch.Tensor, name)
            self._methods[name] = original

            def guarded(tensor, *args, _name=name, _original=original, **kwargs):
                if self.on_device(tensor):
                    self._read(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, guarded)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._methods.items():
            setattr(torch.Tensor, name, original)
        self._methods.clear()
        return super().__exit__(*exc)


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """What lives on the device from the start: the model's parameters and buffers."""
    return [*model.parameters(), *model.buffers()]
