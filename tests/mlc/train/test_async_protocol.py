"""The async job's process boundary: every RPC call goes through mlc/train/async_ps/protocol.py,
every function sent is one of its endpoints (top-level, so RPC can send it by module path), and
no other module of the package keeps state that those calls reach."""

import ast
import pickle
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlc.train.async_ps import protocol
from mlc.train.async_ps.coordinator import INTERVALS, Marks
from mlc.train.async_ps.server import Server

PACKAGE = Path(protocol.__file__).parent
RPC_CALLS = {"rpc_sync", "rpc_async", "remote"}
# membership.py replaces one step of torch's own join (torch's _update_group_membership on
# every member): torch's protocol, with the state torch's hook needs.
TORCH_JOIN = "membership.py"


def modules() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def called_name(node: ast.Call) -> str | None:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def test_only_the_protocol_makes_rpc_calls():
    found = {
        name
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and called_name(node) in RPC_CALLS
    }
    assert found == {"protocol.py", TORCH_JOIN}


def test_every_protocol_function_another_module_names_is_an_endpoint_or_a_helper():
    helpers = {"call", "send", "serve"}
    endpoints = {f.__name__ for f in protocol.ENDPOINTS}
    named = {
        node.attr
        for name, tree in modules().items()
        if name != "protocol.py"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "protocol"
        and callable(getattr(protocol, node.attr, None))
        and not isinstance(getattr(protocol, node.attr), type)
    }
    assert named - endpoints - helpers == set()
    assert named & endpoints  # the other modules do call through it


def test_endpoints_are_top_level_functions_sent_by_module_path():
    assert len(protocol.ENDPOINTS) == 13
    for endpoint in protocol.ENDPOINTS:
        assert endpoint.__module__ == protocol.__name__
        assert endpoint.__qualname__ == endpoint.__name__  # not nested, not a method
        assert getattr(protocol, endpoint.__name__) is endpoint
        assert pickle.loads(pickle.dumps(endpoint)) is endpoint


def test_the_coordinator_calls_its_own_server_by_the_endpoint_names():
    # ServerGroup.call(0, endpoint) runs the Server method of the endpoint's name
    for name in ("pull", "push", "load", "pause", "resume", "set_stop", "stats", "snapshot"):
        assert getattr(protocol, name) in protocol.ENDPOINTS
        assert callable(getattr(Server, name))


def test_call_and_send_refuse_a_function_that_is_not_an_endpoint():
    with pytest.raises(ValueError, match="not an endpoint"):
        protocol.call("server0", print, timeout=1.0)
    with pytest.raises(ValueError, match="not an endpoint"):
        protocol.send("server0", Server.pull, timeout=1.0)


def test_no_other_module_keeps_state_at_module_level():
    # Constants only (numbers, strings, tuples of them) and __all__
    def constant(value) -> bool:
        if isinstance(value, ast.Constant):
            return True
        if isinstance(value, ast.Tuple):
            return all(constant(v) for v in value.elts)
        return False

    def state(node) -> bool:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
            return False
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return not constant(node.value) and [getattr(t, "id", None) for t in targets] != ["__all__"]

    found = [
        f"{name}:{node.lineno}"
        for name, tree in modules().items()
        if name not in ("protocol.py", TORCH_JOIN)
        for node in tree.body
        if state(node)
    ]
    assert found == []


def test_register_records_the_process_and_reports_a_replacement_once(monkeypatch):
    ready = threading.Event()
    ready.set()
    server = SimpleNamespace(
        lock=threading.Lock(), loader={1: {"epoch": 0, "batch": 7}}, stop=False, samples=640
    )
    monkeypatch.setattr(protocol, "READY", ready)
    monkeypatch.setattr(protocol, "SERVER", server)
    monkeypatch.setattr(protocol, "WORKERS", protocol.Workers())
    assert protocol.register(0) == (None, False)
    assert protocol.register(1, "worker1_r1", 1) == ({"epoch": 0, "batch": 7}, False)
    workers = protocol.WORKERS
    assert workers.current_names() == {0: "worker0", 1: "worker1_r1"}
    assert workers.restart_counts() == {0: 0, 1: 1}
    assert [(e["event"], e["worker"], e["samples"]) for e in workers.take_joined()] == [
        ("rejoined", 1, 640)
    ]
    assert workers.take_joined() == []
    protocol.leave(0)
    protocol.fail(1, "worker 1: loss is nan")
    assert workers.not_done(2, lost=set()) == {1}
    assert workers.not_done(2, lost={1}) == set()
    assert workers.first_failure() == "worker 1: loss is nan"


def test_marks_say_which_intervals_the_sample_count_crossed():
    train = SimpleNamespace(log_every=100, eval_every=250, checkpoint_every=500)
    marks = Marks(train, 480)
    assert marks.crossed(490) == set()
    assert marks.crossed(510) == {"log_every", "eval_every", "checkpoint_every"} == set(INTERVALS)
    assert marks.crossed(640) == {"log_every"}
    assert marks.crossed(640) == set()
