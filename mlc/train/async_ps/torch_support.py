"""The torch releases the async mode runs on, checked before any of its processes starts.

The mode relies on torch.distributed.rpc beyond its public API: membership.py replaces one
private step of the dynamic group's join (``backend_registry._set_devices_and_reverse_device_map``)
with its own version, calls torch's ``_utils._update_group_membership`` and reads the store keys
of torch's join protocol, and ``membership.leave_together`` ends a dynamic group through the
agent's ``join``. It was written and is tested against torch 2.13. The replaced function and the
ones it works with (``_tensorpipe_init_backend_handler``, ``_group_membership_management``,
``_update_group_membership``; ``shutdown``, ``_finalize_shutdown`` and ``_wait_all_workers`` of
``api.py``) are the same code in torch 2.11.0 and 2.12.1 (compared with their docstrings
removed); in 2.14 the replaced function changed (it counts devices through
``torch.accelerator``). Any other release is refused here, with the range and what to do,
instead of failing later in a way that is hard to read (a join that hangs, a dead member that
is never removed). The synchronous job and ``mlc eval`` use none of it and run on any torch
that pyproject.toml allows.
"""

from __future__ import annotations

import re

FIRST = (2, 11)  # the oldest release whose rpc code matches the tested one
END = (2, 14)  # the first release that differs (or was not compared)
TESTED = "2.13"
RANGE = ">=2.11,<2.14"


class TorchVersionError(ValueError):
    """The installed torch is outside the range the async mode supports."""


def check_torch(version: str | None = None) -> None:
    """TorchVersionError unless ``version`` (default: the installed torch's) is supported."""
    if version is None:
        import torch

        version = str(torch.__version__)
    found = re.match(r"(\d+)\.(\d+)", version)
    if found and FIRST <= (int(found[1]), int(found[2])) < END:
        return
    raise TorchVersionError(
        f"train.mode=async needs torch {RANGE} (tested on {TESTED}; 2.11 and 2.12 have the "
        f"same torch.distributed.rpc code it depends on), but torch {version} is installed: "
        f"install a torch in that range (e.g. pip install 'torch{RANGE}') or train with "
        "train.mode=sync"
    )
