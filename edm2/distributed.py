"""torch.distributed set-up from torchrun's environment, and small rank helpers.

Without torchrun (no WORLD_SIZE in the environment) everything works as a single process of rank 0.
Under torchrun the backend is nccl when the chosen device is CUDA and gloo otherwise (CPU clusters,
tests on this machine).
"""

import contextlib
import os

import torch
import torch.distributed as dist

from .errors import EDM2Error


class DeviceError(EDM2Error):
    """The requested --device does not exist or is not available on this machine."""


def default_device(device=None) -> torch.device:
    """`device` when given (checked to exist here; raises DeviceError naming --device otherwise), else
    this rank's CUDA device if CUDA is available, else the CPU. The one device chooser of every command."""
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise DeviceError(f'--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)') from None
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise DeviceError(f'--device {device}: CUDA is not available here')
        if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f'--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)')
        if device.type not in ('cpu', 'cuda', 'mps', 'xpu'):
            raise DeviceError(f'--device {device}: unsupported device type (use cpu or cuda)')
        return device
    if torch.cuda.is_available():
        return torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count())
    return torch.device('cpu')


def init(device=None) -> torch.device:
    """Initialise the process group when launched by torchrun; return the device this rank uses."""
    device = default_device(device)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if int(os.environ.get('WORLD_SIZE', 1)) > 1 and not dist.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        kwargs = dict(device_id=device) if device.type == 'cuda' else {}
        dist.init_process_group(backend=backend, init_method='env://', **kwargs)
    return device


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def rank0_first():
    """Run the block on rank 0 before the other ranks, which wait at a barrier until rank 0 has left it
    (successfully or not): a download inside happens once, and the other ranks then read the cache."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op for one process); returns it for chaining."""
    if dist.is_initialized() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_to_main(obj) -> list:
    """Every rank's picklable `obj` as a list on rank 0 (in rank order); None on the other ranks."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out
