"""Bytes of activations held for backward, counted as autograd saves and frees them.

    counter = SavedTensorBytes(exclude=model.parameters())
    with counter:
        loss = model(tokens, labels=labels).mean()   # forward: saved tensors are counted
    loss.backward()                                  # backward: they are released
    counter.peak                                     # the most bytes held at once

Each saved tensor is counted once per storage (views of one buffer share it) from the moment
autograd saves it until the graph releases it; storages of `exclude` (the parameters, which
backward saves too) are not activations and are not counted. This is the number the activation-memory
formulas predict; on CPU, where no allocator reports a peak, it is the measurable one.
"""

import torch


class SavedTensorBytes:
    """A context manager counting the bytes of tensors saved for backward inside it (live and peak)."""

    def __init__(self, exclude=()):
        self.live = self.peak = 0
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._users: dict[tuple, int] = {}  # storage key -> number of saved references alive
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def reset_peak(self) -> None:
        self.peak = self.live

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self._excluded:
            return tensor
        key = (storage.data_ptr(), tensor.device)
        if self._users.get(key, 0) == 0:
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._users[key] = self._users.get(key, 0) + 1
        return _Saved(tensor, key, self, storage.nbytes())

    @staticmethod
    def _unpack(saved) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key: tuple, nbytes: int) -> None:
        self._users[key] -= 1
        if self._users[key] == 0:
            del self._users[key]
            self.live -= nbytes


class _Saved:
    """What autograd keeps instead of the tensor; its end (the graph freed it) uncounts the bytes."""

    __slots__ = ("tensor", "key", "counter", "nbytes")

    def __init__(self, tensor, key, counter, nbytes):
        self.tensor, self.key, self.counter, self.nbytes = tensor, key, counter, nbytes

    def __del__(self):
        self.counter._release(self.key, self.nbytes)
