"""The asynchronous mode (train.mode=async): sharding plan, exactness against the synchronous job,
convergence, staleness, the hard limit, worker and server death, kill -9 and resume.

Every run is a subprocess with a timeout and its own free rendezvous port (ps.port=0 picks one).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mlc.cli import main
from mlc.config import load_config
from mlc.io import load_state as load_checkpoint
from mlc.models import build_model, create_model
from mlc.train.async_ps.plan import HEAD, assemble, plan_shards, split
from mlc.train.checkpoint import list_checkpoints
from mlc.train.validate import validate

from .conftest import tiny_config

ROOT = Path(__file__).resolve().parents[3]
TIMEOUT = 120  # seconds for any one run; a hang fails the test instead of the suite
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# A task on which the validation loss measures learning: crops that keep the mosaic's items (as
# configs/demo.yaml), a head starting at p = 0.1, one middle block, 400 updates. Fewer updates
# leave the validation loss at its initial value (about 0.57): the batch-norm running statistics
# (momentum 0.01) lag the weights. Measured here (2026-11-30 09:40, after the loader's crop
# randomness changed): the synchronous job ends at 0.450-0.477 over seeds 0-5 (0.4504 with seed
# 0), the async one (2 workers, each push answered before the next step) at 0.448-0.508 over 28
# runs (mean 0.466, one above 0.49; a CI run gave 0.491 too), from 0.57. One seed's synchronous
# loss is one draw from that spread, so the synchronous mode is represented by seeds 0, 1, 2.
LEARN = ["data.crop_scale=[0.8, 1.0]", "data.crop_fraction=1.0", "model.head_prior=0.1"]
LEARN += ["model.middle_blocks=1", "optim.lr=0.002", "train.samples=6400", "train.log_every=1600"]
LEARN += ["train.eval_every=6400", "data.val_split=test"]
SEEDS = (0, 1, 2)


def sets(overrides):
    return [x for o in overrides for x in ("--set", o)]


def async_args(dataset, out, *extra):
    return tiny_config(dataset, out, "train.mode=async", "data.val_split=null", *extra)


def start(args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlc.cli", "train", *sets(args)]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV
    )


def run(args, resume=None) -> str:
    cmd = [sys.executable, "-m", "mlc.cli", "train", *sets(args)]
    cmd += ["--resume", resume] if resume else []
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def records(out: Path, kind: str) -> list[dict]:
    found = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written while the test reads
            continue
        if record["kind"] == kind:
            found.append(record)
    return found


def last_state(out: Path) -> dict:
    return load_checkpoint(list_checkpoints(out)[-1])


def pids(out: Path) -> dict:
    """The launcher's processes: server0, worker0, ... -> pid."""
    found = json.loads((out / "async" / "processes-node0.json").read_text())
    return {k: v for k, v in found.items() if k.startswith(("server", "worker"))}


def wait_for(predicate, proc, seconds=TIMEOUT):
    deadline = time.time() + seconds
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run ended first: {proc.communicate()[0][-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("timed out waiting")
        time.sleep(0.05)


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie (an orphan's parent may never reap it here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def all_gone(out: Path, seconds: float = 10.0) -> bool:
    deadline = time.time() + seconds
    while not all(gone(pid) for pid in pids(out).values()):
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


# --------------------------------------------------------------------- the sharding plan


@pytest.mark.parametrize("servers", [1, 2, 3, 4])
def test_plan_puts_every_head_row_on_exactly_one_server(servers):
    model = create_model("xception-tiny", width=0.125, num_classes=10)
    state = model.state_dict()
    plan = plan_shards({k: tuple(v.shape) for k, v in state.items()}, servers)
    for name in HEAD:
        owners = torch.zeros(10, dtype=torch.long)
        for pieces in plan:
            for p in pieces:
                if p.name == name:
                    owners[p.start : p.stop] += 1
        assert owners.tolist() == [1] * 10, name  # each class row on exactly one server
    others = [p.name for pieces in plan for p in pieces if p.name not in HEAD]
    assert sorted(others) == sorted(k for k in state if k not in HEAD)  # each once, whole
    # Balance: greedy placement leaves servers at most one tensor's size apart.
    loads = [sum(p.take(state[p.name]).numel() for p in pieces) for pieces in plan]
    assert max(loads) - min(loads) <= max(v.numel() for v in state.values())
    full = assemble(plan, split(plan, state))
    assert full.keys() == state.keys()
    assert all(torch.equal(full[k], state[k]) for k in state)


def test_plan_for_the_paper_head_balances_17000_classes():
    with torch.device("meta"):
        model = create_model("xception", num_classes=17_000)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for servers in (2, 4):
        plan = plan_shards(shapes, servers)
        rows = [p.stop - p.start for pieces in plan for p in pieces if p.name == "head.weight"]
        assert sum(rows) == 17_000 and max(rows) - min(rows) <= 1
        loads = [sum(_numel(shapes[p.name], p) for p in pieces) for pieces in plan]
        assert max(loads) / min(loads) < 1.05  # 55.7M elements, within 5%


def _numel(shape, piece):
    n = 1
    for d in shape:
        n *= d
    return n if piece.start is None else n // shape[0] * (piece.stop - piece.start)


# ------------------------------------------------------------------------ exactness


def test_one_worker_without_pipelining_is_the_synchronous_job(mosaics, tmp_path):
    # One worker that waits for each push (push_in_flight=0) and pulls every step makes the
    # same updates as the synchronous job on the same batches: the parameters must agree bit
    # for bit, with 1 server and with 2 (the head split by rows; optimizers are elementwise).
    # Batch-norm statistics are folded in by a different formula: equal within rounding.
    common = ["train.samples=320", "train.checkpoint_every=100000", "data.val_split=null"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: the same kernels, the same sums
    try:
        assert main(["train", *sets(tiny_config(mosaics, tmp_path / "sync", *common))]) == 0
    finally:
        torch.set_num_threads(threads)
    sync = last_state(tmp_path / "sync")["model"]
    params = {n for n, _ in create_model("xception-tiny", width=0.125).named_parameters()}
    for servers in (1, 2):
        out = tmp_path / f"async{servers}"
        run(
            async_args(
                mosaics,
                out,
                *common,
                f"ps.servers={servers}",
                "ps.workers=1",
                "ps.push_in_flight=0",
            )
        )
        state = last_state(out)
        assert state["samples"] == 320 and state["step"] == 20
        assert [s["version"] for s in state["servers"]] == [20] * servers
        rows = [(s, e) for pieces in state["plan"] for name, s, e in pieces if name == HEAD[0]]
        assert sorted(rows) == [
            (10 * i // servers, 10 * (i + 1) // servers) for i in range(servers)
        ]
        for name, value in state["model"].items():
            if name in params:
                assert torch.equal(value, sync[name]), name
            else:
                assert torch.allclose(value.float(), sync[name].float(), atol=1e-6), name


# ---------------------------------------------------------------- convergence, staleness


@pytest.fixture(scope="module")
def sync_reference(mosaics, tmp_path_factory):
    """The synchronous job's final validation losses with SEEDS, and the initial loss."""
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads next to the async tests' processes only contend
    try:
        for seed in SEEDS:
            out = tmp_path_factory.mktemp(f"sync_reference{seed}")
            args = tiny_config(mosaics, out, *LEARN, f"train.seed={seed}")
            assert main(["train", *sets(args)]) == 0
            losses.append(records(out, "val")[-1]["loss"])
        config = load_config(None, tiny_config(mosaics, out, *LEARN))
        classes = json.loads((mosaics / "classes.json").read_text())["classes"]
        torch.manual_seed(config.train.seed)  # the job's initial weights
        model = build_model(config.model, len(classes), config.data.channels)
        initial = validate(
            model, config, [c["id"] for c in classes], np.ones(10), 0, 1, torch.device("cpu")
        )
    finally:
        torch.set_num_threads(threads)
    return {"losses": losses, "initial_loss": initial["loss"]}


def within(loss: float, reference: dict, tolerance: float) -> bool:
    """loss lies within tolerance of the synchronous losses' range."""
    return min(reference["losses"]) - tolerance < loss < max(reference["losses"]) + tolerance


def check_staleness_log(out: Path, push_in_flight: int, pull_every: int) -> dict:
    """The staleness histogram counts every update; a worker's own updates that land after
    its pull are at most the pushes it had in flight then plus the steps since."""
    train = records(out, "train")
    assert all(r["samples_per_s"] > 0 for r in train)
    final = train[-1]
    histogram = {int(k): v for k, v in final["staleness"][0].items()}
    assert sum(histogram.values()) == final["versions"][0] == final["step"]  # every update
    assert min(histogram) >= 0
    assert set(final["own_staleness_max"]) == {"0", "1"}
    assert max(final["own_staleness_max"].values()) <= push_in_flight + pull_every - 1
    return histogram


def test_two_workers_reach_the_synchronous_loss_and_log_staleness(
    mosaics, tmp_path, sync_reference
):
    # Which update lands first differs from run to run, and so does the loss (see LEARN): the
    # median of three runs (seeds as the reference's) must lie within 0.02 of the synchronous
    # losses. The median, as one run in 30 strays 0.03-0.04 above the async mean. Pushes are
    # answered before the next step (with one push in flight the runs spread wider still).
    losses = []
    for seed in SEEDS:
        out = tmp_path / f"async{seed}"
        run(
            async_args(
                mosaics, out, *LEARN, "ps.push_in_flight=0", "ps.pull_every=1", f"train.seed={seed}"
            )
        )
        val = records(out, "val")[-1]
        assert 6400 <= val["samples"] <= 6400 + 2 * 16  # W x (in flight + 1) batches over
        assert val["loss"] < sync_reference["initial_loss"] - 0.07  # it learned
        losses.append(val["loss"])
        histogram = check_staleness_log(out, push_in_flight=0, pull_every=1)
        assert max(histogram) >= 1  # the other worker's updates do land in between
    assert within(sorted(losses)[1], sync_reference, 0.02), (losses, sync_reference)


def test_pushes_in_flight_bound_the_staleness(mosaics, tmp_path):
    out = tmp_path / "in_flight"
    run(async_args(mosaics, out, "train.samples=960", "ps.push_in_flight=2", "ps.pull_every=2"))
    histogram = check_staleness_log(out, push_in_flight=2, pull_every=2)
    assert max(histogram) >= 2  # the pipelining did let updates go stale


def test_hard_staleness_limit_drops_and_counts(mosaics, tmp_path):
    # One worker, each push answered before the next (in flight 0), a pull every 3 steps,
    # limit 0: after a pull, the first update is fresh (applied); the next two were computed
    # from the same pulled version after the server moved on by one (staleness 1): dropped.
    out = tmp_path / "limit"
    args = async_args(
        mosaics,
        out,
        "train.samples=480",
        "ps.workers=1",
        "ps.push_in_flight=0",
        "ps.pull_every=3",
        "ps.max_staleness=0",
    )
    run(args)
    state = last_state(out)
    pushes = 480 // 16
    assert state["servers"][0]["received"] == pushes
    assert state["step"] == pushes // 3 and state["servers"][0]["dropped"] == pushes - pushes // 3
    assert {int(k) for k in state["servers"][0]["staleness"]} == {0}
    final = records(out, "train")[-1]
    assert final["dropped"] == [pushes - pushes // 3]


# ---------------------------------------------------------------------- the end of a run


@pytest.mark.parametrize("group", ["static", "dynamic"])
def test_a_clean_run_ends_without_connection_warnings(mosaics, tmp_path, group):
    # 2 servers, 4 workers, nothing dies: every process leaves the RPC group together, so no
    # TensorPipe agent sees a connection close while it still runs. Before, such a run printed
    # 14 to 16 lines "RPC agent for worker1 encountered error when reading incoming request
    # from server0: pipe closed" (or "eof") at its end. Dynamic: the group a replacement can
    # join (ps.restart_workers > 0), which leaves through membership.leave_together.
    out = tmp_path / "run"
    extra = ["ps.servers=2", "ps.workers=4"]
    extra += ["ps.restart_workers=1"] if group == "dynamic" else []
    output = run(async_args(mosaics, out, *extra))
    warnings = [line for line in output.splitlines() if re.match(r"\[[WE]\d{4} ", line)]
    assert warnings == [], output[-4000:]
    assert "pipe closed" not in output and "eof (" not in output
    summary = records(out, "summary")[-1]
    assert summary["lost_workers"] == [] and summary["samples"] >= 320
    assert all_gone(out)


# ---------------------------------------------------------------------------- failures


def test_a_killed_worker_lets_the_others_finish(mosaics, tmp_path):
    out = tmp_path / "run"
    proc = start(async_args(mosaics, out, "train.samples=1600"))
    wait_for(lambda: (out / "metrics.jsonl").is_file() and records(out, "train"), proc)
    os.kill(pids(out)["worker1"], signal.SIGKILL)
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, output[-3000:]
    assert "worker 1 was killed by SIGKILL; the other workers go on" in output
    assert "replacement" not in output  # ps.restart_workers=0 (the default): no restart
    summary = records(out, "summary")[-1]
    assert summary["lost_workers"] == [1] and summary["samples"] >= 1600
    assert summary["restarts"] == {} and "worker1_r1" not in summary["pushes"]
    assert all_gone(out)


def test_kill_9_and_resume_continue_versions_and_quality(mosaics, tmp_path, sync_reference):
    # Pushes answered before the next step, as in the loss test above: with one in flight
    # the loss of an uninterrupted run already spreads by 0.025. Three runs (the reference's
    # seeds), the quality judged on their median as in the loss test: a single async run
    # strays now and then (0.449-0.494 in 14 runs of this test, once 0.52).
    losses = []
    for seed in SEEDS:
        out = tmp_path / f"run{seed}"
        args = async_args(
            mosaics,
            out,
            *LEARN,
            "ps.push_in_flight=0",
            "train.checkpoint_every=1600",
            f"train.seed={seed}",
        )
        proc = start(args)
        wait_for(lambda out=out: len(list_checkpoints(out)) >= 1, proc)
        proc.send_signal(signal.SIGKILL)  # the launcher; its processes follow it
        proc.communicate(timeout=TIMEOUT)
        assert all_gone(out)  # the orphans notice within node.PARENT_POLL
        saved = last_state(out)
        assert 1600 <= saved["samples"] < 6400
        output = run(args, resume="auto")
        assert f"version {saved['step']}" in output
        after = records(out, "train")
        resumed = [r for r in after if r["samples"] > saved["samples"]]
        assert resumed and resumed[0]["step"] > saved["step"]
        final = last_state(out)
        # One server, no limit: every push received is applied, across the restart too.
        assert final["step"] == final["samples"] // 16 and final["samples"] >= 6400
        assert final["loader"] != saved["loader"]  # the workers' data streams went on
        losses.append(records(out, "val")[-1]["loss"])
    median = sorted(losses)[1]
    # Within 0.04 of the synchronous losses, a third of what training gains over the initial
    # 0.57.
    assert median < sync_reference["initial_loss"] - 0.07, losses  # it learned
    assert within(median, sync_reference, 0.04), (losses, sync_reference)


def test_a_dead_server_stops_the_job_with_a_resumable_checkpoint(mosaics, tmp_path):
    out = tmp_path / "run"
    args = async_args(mosaics, out, "train.samples=100000", "ps.servers=2")
    proc = start(args)
    wait_for(lambda: len(list_checkpoints(out)) >= 1, proc)
    os.kill(pids(out)["server1"], signal.SIGKILL)
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2, output[-3000:]
    assert "server 1 was killed by SIGKILL" in output and "resume with --resume auto" in output
    assert all_gone(out)
    state = last_state(out)  # complete and loadable (weights_only)
    assert state["mode"] == "async" and len(state["servers"]) == 2
    assert str(list_checkpoints(out)[-1]) in output


def test_two_machines_launch_with_one_command_each(mosaics, tmp_path):
    # The several-machine launch, with both "machines" here: the same command with ps.nodes=2
    # and each node_rank; server i and worker j run on node i % 2 and j % 2.
    from mlc.dist import free_port

    out = tmp_path / "run"
    common = async_args(mosaics, out, "train.samples=640", "ps.servers=2", "ps.nodes=2")
    common += [f"ps.port={free_port()}"]
    node1 = start([*common, "ps.node_rank=1"])
    run([*common, "ps.node_rank=0"])
    output, _ = node1.communicate(timeout=TIMEOUT)
    assert node1.returncode == 0, output[-3000:]
    assert "(2 here, node 1/2)" in output
    placed = json.loads((out / "async" / "processes-node1.json").read_text())
    assert {k for k in placed if k[:6] in ("server", "worker")} == {"server1", "worker1"}
    state = last_state(out)
    assert [s["version"] for s in state["servers"]] == [state["step"]] * 2  # no drops
    assert state["samples"] >= 640 and all(p is not None for p in state["loader"])


def test_a_killed_worker_is_replaced_and_rejoins(mosaics, tmp_path):
    # ps.restart_workers=1: the launcher starts a replacement for the killed worker's slot; it
    # joins the running RPC group (dynamic membership), continues the slot's data stream from
    # the last position server 0 received, pushes again, and the job ends normally.
    out = tmp_path / "run"
    proc = start(async_args(mosaics, out, "train.samples=4800", "ps.restart_workers=1"))

    def worker1_pushed() -> bool:
        train = (out / "metrics.jsonl").is_file() and records(out, "train")
        return bool(train) and train[-1]["pushes"].get("worker1", 0) >= 2

    wait_for(worker1_pushed, proc)
    killed = pids(out)["worker1"]
    os.kill(killed, signal.SIGKILL)
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, output[-3000:]
    assert "worker 1 was killed by SIGKILL; starting a replacement (restart 1 of 1)" in output
    rejoined = [r for r in records(out, "worker") if r["event"] == "rejoined"]
    assert [(r["worker"], r["name"], r["restart"]) for r in rejoined] == [(1, "worker1_r1", 1)]
    summary = records(out, "summary")[-1]
    assert summary["lost_workers"] == [] and summary["restarts"] == {"1": 1}
    assert summary["samples"] >= 4800
    assert summary["pushes"]["worker1_r1"] > 0  # the replacement's own pushes
    # Its data stream continued after the last batch of the slot whose push server 0 received
    # (each push is one batch: 37 batches per epoch per worker here, the kill came earlier).
    start_at, final = rejoined[0]["position"], last_state(out)["loader"][1]
    assert start_at == {"epoch": 0, "batch": summary["pushes"]["worker1"]}
    assert (final["epoch"], final["batch"]) > (0, start_at["batch"])
    assert pids(out)["worker1"] != killed and gone(killed)
    assert all_gone(out)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ps.restart_workers=-1", "ps.restart_workers must be >= 0"),
        ("ps.restart_workers=20000", "servers + workers x (restarts + 1)"),
    ],
)
def test_restart_workers_is_validated(tmp_path, override, message):
    from mlc.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, async_args(tmp_path, tmp_path / "out", override))


def test_a_worker_that_finishes_during_the_liveness_check_is_not_lost(monkeypatch):
    # A worker says it is done (protocol.leave, waited for) and then exits. If the
    # coordinator's liveness ping reaches it after that, the ping fails: a normal finish, not a
    # lost worker (a CI run at 15:33 reported a replacement that finished as lost).
    from types import SimpleNamespace

    from mlc.train.async_ps import liveness, protocol

    workers = protocol.Workers()
    workers.names.update({0: "worker0", 1: "worker1_r1"})
    monkeypatch.setattr(protocol, "WORKERS", workers)
    written = []

    def ping(w):  # worker 1 leaves and exits while its ping is on the way; worker 0 is gone
        if w == 1:
            protocol.leave(1)
        return False

    stub = SimpleNamespace(
        config=SimpleNamespace(ps=SimpleNamespace(workers=2)),
        lost=set(),
        lost_at={},
        metrics=SimpleNamespace(write=lambda record, kind: written.append(record)),
        say=lambda text: None,
        alive=ping,
    )
    monkeypatch.setattr(protocol, "SERVER", SimpleNamespace(samples=640))
    liveness.WorkerWatch.check(stub)
    assert stub.lost == {0}  # a worker that never said it left is still lost
    assert [(r["event"], r["worker"]) for r in written] == [("lost", 0)]
