"""Finds host syncs in a training step: on a GPU with CUDA's own sync debug mode, on the CPU by watching tensor calls.

A host sync is anything that makes the Python thread wait for the device: reading a device value on the host
(``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``, ``.cpu()``, ``.numpy()``), an op whose output shape depends on
the data (``nonzero``, ``masked_select``, ``unique``, indexing with a boolean mask, ``repeat_interleave`` with
tensor repeats and no output size), a blocking host-to-device copy (``torch.as_tensor(x, device=d)``, ``.to(d)``
of a host tensor without ``non_blocking``), and an explicit device synchronisation (``torch.cuda.synchronize``,
DeepSpeed's ``get_accelerator().synchronize()``). On the CPU none of these wait, so the guard records the calls that
would: a `torch.overrides.TorchFunctionMode` sees every tensor call made inside it (keeping its own account of which
tensors would live on the device), and the synchronise functions are wrapped while it is active. On a GPU ``torch.cuda.set_sync_debug_mode("warn")`` adds what CUDA itself reports.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostSync", "HostSyncs", "watch_host_syncs", "optimizer_host_tensors"]

#: tensor methods that read a device value on the host
READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "numpy", "cpu"})
#: ops whose output shape depends on the data: the host must learn it from the device
DATA_SHAPED = frozenset({"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount",
                         "histc", "histogram"})
#: calls that make a tensor from host data (on the host, unless given a device)
CREATION = frozenset({"tensor", "as_tensor", "from_numpy", "zeros", "ones", "empty", "full", "arange", "linspace",
                      "logspace", "eye", "rand", "randn", "randint", "randperm", "scalar_tensor", "empty_strided"})
#: frames of these packages are skipped when naming where a sync was called from
_LIBRARY_FRAMES = ("/torch/", "/synray/train/syncguard.py")


@dataclass(frozen=True)
class HostSync:
    """One call that would make the host wait for the device: what it was, and where it was called from."""

    kind: str       # "read", "data-dependent shape", "blocking copy", "synchronize", "cuda"
    call: str       # the function or method
    where: str      # file:line of the first caller outside torch

    def __str__(self) -> str:
        return f"{self.kind}: {self.call} at {self.where}"


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not any(part in frame.filename for part in _LIBRARY_FRAMES):
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "?"


def _has_bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple | list) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in torch.utils._pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _target_device(name: str, args: tuple, kwargs: dict) -> Any:
    """The device a call names explicitly (``device=``, or ``.to``'s first argument when it is a device)."""
    if kwargs.get("device") is not None:
        return kwargs["device"]
    if name == "to" and len(args) > 1 and isinstance(args[1], str | torch.device):
        return args[1]
    if name == "to" and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return args[1].device
    return None


class HostSyncs(TorchFunctionMode):
    """The host syncs of every tensor call made while the mode is active (see the module's docstring).

    On the CPU every tensor is a host tensor, so the mode keeps its own account of which tensors would live on
    the device in a GPU run: all of them, except those made inside it from host data (a creation call without a
    device, ``.cpu()``, a result computed from host tensors only) and the ones named in `host` (the optimizer's
    step counters, which torch keeps on the host). Reads, data-dependent shapes and copies count only for tensors
    on the device in that account.
    """

    def __init__(self, host: Any = ()) -> None:
        super().__init__()
        self.found: list[HostSync] = []
        self._host: dict[int, weakref.ref] = {}   # by identity (tensors compare elementwise)
        for t in _tensors(host):
            self._add_host(t)

    def _add_host(self, t: torch.Tensor) -> None:
        key = id(t)
        self._host[key] = weakref.ref(t, lambda _, key=key: self._host.pop(key, None))

    def on_device(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        ref = self._host.get(id(t))
        return ref is None or ref() is not t

    def _kind(self, name: str, args: tuple, kwargs: dict, device: Any) -> str | None:
        first = args[0] if args else None
        if name in READS:
            return "read" if self.on_device(first) else None
        if name in DATA_SHAPED or (name == "where" and len(args) + len(kwargs) == 1):
            return "data-dependent shape" if self.on_device(first) else None
        if name in ("__getitem__", "__setitem__", "index_put", "index_put_") and len(args) > 1 \
                and _has_bool_index(args[1]) and self.on_device(first):
            return "data-dependent shape"
        if name == "repeat_interleave" and len(args) > 1 and self.on_device(args[1]) \
                and kwargs.get("output_size") is None:
            return "data-dependent shape"
        if device is None:
            return None
        if name in ("as_tensor", "tensor") and not isinstance(first, torch.Tensor):
            return "blocking copy"  # host data to the device, waiting for the copy
        blocking = not kwargs.get("non_blocking") and not (len(args) > 3 and args[3] is True)
        if name in ("to", "as_tensor") and isinstance(first, torch.Tensor) and not self.on_device(first) and blocking:
            return "blocking copy"
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        device = _target_device(name, args, kwargs)
        kind = self._kind(name, args, kwargs, device)
        if kind is not None:
            self.found.append(HostSync(kind, name, _caller()))
        out = func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        made_on_host = device is None and (name in CREATION or name in ("cpu", "numpy")
                                           or (inputs and not any(map(self.on_device, inputs))))
        if made_on_host:
            for t in _tensors(out):
                self._add_host(t)
        return out

    def record(self, kind: str, call: str) -> None:
        self.found.append(HostSync(kind, call, _caller()))


def _wrap(owner: Any, attr: str, syncs: HostSyncs, label: str, stack: contextlib.ExitStack) -> None:
    original = getattr(owner, attr, None)
    if original is None:
        return

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        syncs.record("synchronize", label)
        return original(*args, **kwargs)

    setattr(owner, attr, wrapped)
    stack.callback(setattr, owner, attr, original)


@contextlib.contextmanager
def watch_host_syncs(device: torch.device | None = None, host: Any = ()) -> Iterator[HostSyncs]:
    """Record the host syncs of the code inside (`host`: tensors that live on the host in a GPU run too); on a CUDA
    device also CUDA's own report of synchronising calls."""
    syncs = HostSyncs(host)
    with contextlib.ExitStack() as stack:
        _wrap(torch.cuda, "synchronize", syncs, "torch.cuda.synchronize", stack)
        try:
            from deepspeed.accelerator import get_accelerator
        except ImportError:
            pass
        else:
            _wrap(get_accelerator(), "synchronize", syncs, "deepspeed accelerator.synchronize", stack)
        cuda = device is not None and device.type == "cuda"
        if cuda:
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            stack.callback(torch.cuda.set_sync_debug_mode, previous)
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
        stack.enter_context(syncs)
        yield syncs
        if cuda:
            syncs.found.extend(HostSync("cuda", str(w.message).splitlines()[0], f"{w.filename}:{w.lineno}")
                               for w in caught if "synchroniz" in str(w.message))


def optimizer_host_tensors(optimizer: Any) -> list[torch.Tensor]:
    """The step counters of a torch optimizer (and of the optimizers it wraps, as DeepSpeed's do): torch keeps them
    on the host unless the optimizer is fused or capturable."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        on_device = {id(p) for g in getattr(optimizer, "param_groups", ()) if g.get("fused") or g.get("capturable")
                     for p in g["params"]}
        state = getattr(optimizer, "state", None)
        if isinstance(state, dict):
            found += [s["step"] for p, s in state.items() if isinstance(s, dict) and id(p) not in on_device
                      and isinstance(s.get("step"), torch.Tensor)]
        optimizer = getattr(optimizer, "optimizer", None)
    return found
