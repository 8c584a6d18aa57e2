"""Small copies between the host and the GPU that do not wait for the GPU.

A plain copy of a host tensor to the GPU (`torch.tensor(values, device=...)`) waits for every
kernel queued before it: in the refill loop that is the decode step in flight, and the GPU then
idles while the host prepares the next one. A copy from pinned memory with non_blocking does
not wait; the pinned buffer is kept alive by the caching host allocator until the copy is done.
"""

import torch


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor of `values` on `device`, copied without waiting for the GPU."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A tensor on its way to host memory: from a GPU it is copied to pinned memory without a
    sync, and `get()` waits for that copy only, not for GPU work queued after it."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tensor.device.type != "cuda":
            self._host = tensor
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def get(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host
