"""Small host-to-GPU copies that do not wait for the GPU.

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
