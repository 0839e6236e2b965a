"""Dynamic RPC membership, so that a replacement worker can join a running job.

With ``ps.restart_workers > 0`` every process joins the RPC group in torch's dynamic mode
(``init_rpc`` without ``world_size``). Joining works like this in torch 2.13 (see
``torch/distributed/rpc/backend_registry.py``): under a token in the rendezvous store
(``RpcGroupManagementToken``) the joiner reads the member list ``names/_ALL_WORKER_INFOS``
(``"name-id,name-id,..."``), appends itself, then calls every listed member so that it adds the
joiner to its own tables. A member that has died stays in that list: the call to it fails
(``ECONNREFUSED``), ``init_rpc`` fails, and its failure path waits for the token it holds itself.

So a joiner here uses its own version of that last step (``join_members``): each listed member
gets the call with ``ps.start_timeout``; a member that fails it is gone, and the joiner removes
it from the store's list (it holds the token, so no other joiner reads the list meanwhile) and
from its own agent's tables (``_update_group_membership(..., is_join=False)``). Members never
rejoin under the same name and id: incarnation k of worker j is ``worker<j>_r<k>`` with id
``servers + workers * k + j``, so no member's tables hold a stale entry under a live name.

A process killed while it held the token (during its own join) would leave it held: the
replacement of a worker releases the token of its predecessors before it joins
(``release_tokens``). CPU only: no device maps are exchanged (the job sets none).

At the end of a job where every process is alive and done, all leave together
(``leave_together``): torch's graceful shutdown of a dynamic group would have each process,
one at a time, tell the others and close its connections while they still run, and each of
them would log every closed connection.

All of this depends on torch internals: torch_support.py says which releases it is checked
against, and the launcher refuses the others.
"""

from __future__ import annotations

import time
from datetime import timedelta

TOKEN = "RpcGroupManagementToken"  # torch.distributed.rpc._utils
MEMBERS = "_ALL_WORKER_INFOS"  # torch/csrc/distributed/rpc/agent_utils.cpp
PREFIX = "rpc_prefix_0"  # init_rpc's PrefixStore for the first init in a process
LEAVING = "mlc_leaving"  # the job's own key: members at the leave barrier (leave_together)
GO = "mlc_leave_go"  # set once every member is there

_call_timeout = 120.0  # seconds for one join call: set by install()
forgotten: list[str] = []  # members this process found gone while it joined


def worker_name(index: int, restart: int) -> str:
    return f"worker{index}" if restart == 0 else f"worker{index}_r{restart}"


def worker_rank(index: int, restart: int, servers: int, workers: int) -> int:
    return servers + workers * restart + index


def install(call_timeout: float) -> None:
    """Use join_members for this process's dynamic init_rpc."""
    global _call_timeout
    from torch.distributed.rpc import backend_registry

    _call_timeout = call_timeout
    backend_registry._set_devices_and_reverse_device_map = join_members


def join_members(agent) -> None:
    """Tell every live member of the group that this process joined; forget dead ones."""
    from torch.distributed.rpc import api
    from torch.distributed.rpc._utils import _update_group_membership

    me = agent.get_worker_info()
    for info in agent.get_worker_infos():
        if info.name == me.name:
            continue
        try:
            api.rpc_sync(
                info.name,
                _update_group_membership,
                args=(me, [], {}, True),
                timeout=_call_timeout,
            )
        except RuntimeError:
            _forget(agent, info)
    _update_group_membership(me, [], {}, True)  # as torch does for the joiner itself


def _forget(agent, info) -> None:
    import torch.distributed as dist

    names = dist.PrefixStore("names", agent.store)
    entry = f"{info.name}-{info.id}"
    listed = names.get(MEMBERS).decode()
    kept = [e for e in listed.split(",") if e and e != entry]
    names.set(MEMBERS, "".join(f"{e}," for e in kept))
    agent._update_group_membership(info, [], {}, False)
    forgotten.append(info.name)


def release_tokens(addr: str, port: int, timeout: float, dead: list[str]) -> None:
    """Free the membership token if one of the dead processes died holding it."""
    import torch.distributed as dist

    store = dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=timeout))
    base = dist.PrefixStore(PREFIX, store)
    if not base.check([TOKEN]):
        return
    for name in dead:
        for op in ("join", "leave"):
            token = f"Token_for_{name}_{op}"
            if base.compare_set(TOKEN, token, "").decode() == "":
                base.set(token, "Done")  # wakes the joiners that wait for that token


def wait_for(names: list[str], timeout: float) -> None:
    """Until this process's agent knows every one of names (they joined), or TimeoutError."""
    from torch.distributed.rpc import api

    agent = api._get_current_rpc_agent()
    deadline = time.time() + timeout
    while True:
        known = {info.name for info in agent.get_worker_infos()}
        missing = [n for n in names if n not in known]
        if not missing:
            return
        if time.time() > deadline:
            raise TimeoutError(f"{', '.join(missing)} did not join within {timeout:.0f}s")
        time.sleep(0.05)


def leave_together(members: int, timeout: float) -> None:
    """Leave the dynamic group at once with all ``members`` (every one calls this), so that no
    agent sees a connection close while it is not shutting down (TensorPipe logs each one).

    The agent's join (in a dynamic group torch's ``leaveGroup``: it waits until this process has
    no call in flight, takes its name off the store's member list and marks the agent as
    shutting down, closing nothing) and then a barrier in the rendezvous store: only when every
    member is marked does any of them close its connections. The list is edited without the
    group's token: the job is over, no one joins any more, and a stale entry harms no one.
    RuntimeError or a store timeout (``timeout``) if a member does not come."""
    from torch.distributed import rpc
    from torch.distributed.rpc import api

    agent = api._get_current_rpc_agent()
    store = agent.store
    agent.join(shutdown=True)
    if store.add(LEAVING, 1) == members:
        store.set(GO, "")
    store.wait([GO], timedelta(seconds=timeout))
    rpc.shutdown(graceful=False)
