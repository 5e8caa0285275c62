"""What the ops split across processes share: the group they run over, and an all-reduce that turns a
failed peer into an error saying so. The collectives are torch.distributed's functional ones, which
torch.compile traces."""

import torch.distributed as dist

from ._autograd import functional_all_reduce


def sync_group(process_group):
    """The group whose processes share the work (process_group, or the whole world when None), or None when
    there is nothing to share: torch.distributed not initialised, or one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


def all_reduce(tensor, group, name, op="sum"):
    """`op` ("sum", "max", ...) of tensor over the processes of `group` (a new tensor); a failed peer raises a
    RuntimeError that says so, naming `name`, the op whose collective it is."""
    try:
        return functional_all_reduce(tensor, op, group.group_name)
    except RuntimeError as e:
        raise RuntimeError(
            f"{name}: all_reduce over the process group failed: a peer process may have exited or "
            f"stalled past the group's timeout ({e})"
        ) from e
