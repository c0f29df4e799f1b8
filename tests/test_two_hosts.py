"""Two real hosts (issue 21 item 4): `launch/torchrun_multi.sh` on two nodes that only see each other
through a network, with the real trainer, 2 gloo ranks per node, against one host with 4 ranks.

Each node is a network namespace (`ip netns`) with its own address on one end of a veth pair
(10.213.0.1/24 and .2, `lo` up in each); gloo binds the veth (`GLOO_SOCKET_IFNAME`), the static
rendezvous store is on node 0's address. Nothing else is reachable from the namespaces, so the
traffic stays on that link and their loopbacks. The one-host reference (`titan_rw.torchrun
--standalone --nproc-per-node=4`, what `launch/torchrun_single.sh` runs) uses node 0's loopback.

What is checked (docs/design.md §2: weights are sliced by the data-parallel rank, never by
LOCAL_RANK):

- the two-host run equals the one-host run bit for bit: every step's loss, weighted loss, max
  weight, gradient norm, and the rows and per-sample weights each of ranks 2 and 3 (node 1's
  LOCAL_RANK 0 and 1) applied (`fault.audit_rows`). Bitwise because both runs are the same
  computation: the same world size and DP mesh, so the same global batch in the same DP-rank order
  (the loader's row plan depends on the DP rank only), the same FSDP shards, and gloo's collectives
  pick their algorithm (and so their order of float additions) from the ranks alone, not from
  where the ranks run;
- node 1 lost mid-run: its ranks hang after the step-2 checkpoint (`fault_injection.hang_at_step`),
  then every process of its namespace (agent and workers: torch elastic starts workers in their
  own sessions, so the agent's process group alone would leave them) gets SIGKILL, as a host's
  death does. Node 0's launcher must exit, non-zero, within HANG_BOUND_S: gloo sees the closed
  connections at once; without them (a host gone off the network) `comm.train_timeout_seconds`
  ends the collective, and the launcher then waits at most SHUTDOWN_TIMEOUT for its workers;
- both nodes started again resume from step-2 (the newest checkpoint) and finish: metrics.jsonl
  holds one row for every step 1..STEPS, equal to the reference.

Needs root and iproute2 (CI runs as root, launch/ci_services.sh installs iproute2); elsewhere it
skips saying why, and fails instead under TITAN_RW_REQUIRE_NETNS=1 or CI=true (tests/needs.py).
The namespaces (and with them the veth pair) are removed by the fixture's finalizer, after every
process inside them is killed; their names are unique per run, so parallel workers never collide.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from needs import skip_or_fail_netns

from helpers import ROOT as ROOT_DIR  # noqa: E402

ROOT = Path(ROOT_DIR)
pytestmark = pytest.mark.slow

STEPS = 4
HANG_STEP = 2  # = checkpoint.interval: node 1 hangs right after the step-2 checkpoint
TRAIN_TIMEOUT_S = 30  # comm.train_timeout_seconds: a collective waits at most this long after step 1
SHUTDOWN_TIMEOUT_S = 10  # the launcher's wait for its workers after a failure, then SIGKILL
HANG_BOUND_S = TRAIN_TIMEOUT_S + SHUTDOWN_TIMEOUT_S + 60  # + slack for process exit on a loaded machine
ADDR = ("10.213.0.1", "10.213.0.2")
ARGS = [
    "--model.flavor", "tiny", "--training.steps", str(STEPS), "--training.seq_len", "32",
    "--training.local_batch_size", "2", "--training.global_batch_size", "8",  # 4 ranks × 2 rows, no accumulation
    "--logging.log_interval", "1", "--reweight.warmup_steps", "1", "--lr_scheduler.warmup_steps", "1",
    "--checkpoint.interval", str(HANG_STEP), "--checkpoint.keep_latest_k", "0", "--fault.audit_rows", "true",
    "--metrics.enable_tensorboard", "false", "--job.deterministic", "true",
    "--comm.train_timeout_seconds", str(TRAIN_TIMEOUT_S),
    "--data.dataset_path", str(ROOT / "titan_rw/assets/corpus/validation"),  # the small shipped split: ~1 s to tokenize
]
COMPARED = ("loss", "weighted_loss", "max_weight", "max_weight_bound", "grad_norm", "ess", "weight_entropy",
            "temperature", "domains")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {(r.stderr or r.stdout).strip()}")
    return r


def _pids(ns: str) -> list[int]:
    r = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def _kill_all_in(ns: str, deadline_s: float = 30) -> None:
    """SIGKILL every process of namespace `ns` (all started by this test), until none is left."""
    end = time.monotonic() + deadline_s
    while (pids := _pids(ns)) and time.monotonic() < end:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


class Hosts:
    """Two namespaces joined by a veth pair; `start(node, ...)` runs a command inside one."""

    def __init__(self, tmp: Path):
        tag = uuid.uuid4().hex[:8]
        self.ns = (f"trw-{tag}-0", f"trw-{tag}-1")
        self.dev = (f"trw{tag}a", f"trw{tag}b")  # interface names: at most 15 characters
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []

    def up(self) -> None:
        for ns in self.ns:
            _ip("netns", "add", ns)
        _ip("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
        for ns, dev, addr in zip(self.ns, self.dev, ADDR):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        r = subprocess.run(["ip", "netns", "exec", self.ns[1], "ping", "-c", "1", "-W", "5", ADDR[0]],
                           capture_output=True, text=True, timeout=30) if shutil.which("ping") else None
        assert r is None or r.returncode == 0, f"node 1 cannot reach node 0 over the veth: {r.stdout}{r.stderr}"

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for ns in self.ns:
            _kill_all_in(ns)
            _ip("netns", "del", ns, check=False)  # its veth end goes with it (the pair with the first)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def env(self, node: int, iface: str) -> dict[str, str]:
        venv = os.environ.get("VIRTUAL_ENV") or str(Path(sys.executable).parents[1])
        env = dict(os.environ, VENV=venv, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=iface,
                   TORCHINDUCTOR_CACHE_DIR=str(self.tmp / f"inductor{node}"), SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT_S))
        env.pop("TORCHELASTIC_RESTART_COUNT", None)
        return env

    def start(self, node: int, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        fh = open(log, "w")
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[node], *cmd], cwd=ROOT, env=env, stdout=fh,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
        fh.close()
        self.procs.append(p)
        return p

    def start_node(self, node: int, run: Path, log: Path, *extra: str) -> subprocess.Popen:
        env = dict(self.env(node, self.dev[node]), MASTER_ADDR=ADDR[0], MASTER_PORT="29500", NNODES="2",
                   NODE_RANK=str(node), NPROC_PER_NODE="2")
        return self.start(node, ["bash", "launch/torchrun_multi.sh", "train_configs/debug_cpu.toml", *ARGS,
                                 "--job.dump_folder", str(run), *extra], env, log)


def _netns_missing() -> str | None:
    if not shutil.which("ip"):
        return "iproute2 is not installed (no `ip`): apt-get install iproute2 (launch/ci_services.sh does)"
    if os.geteuid() != 0:
        return "network namespaces need root (`ip netns add`); CI runs as root"
    probe = f"trw-probe-{uuid.uuid4().hex[:8]}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` is not allowed here: {(r.stderr or r.stdout).strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _wait(p: subprocess.Popen, timeout: float, log: Path, what: str) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not exit within {timeout:.0f} s (a hang)\n{log.read_text()[-4000:]}")


def _metrics(run: Path) -> dict[int, dict]:
    from titan_rw.observability.jsonl import read_metrics

    return {r["step"]: r for r in read_metrics(str(run))}


def _audit(run: Path, rank: int) -> dict[int, dict]:
    """step -> the last audit line of global rank `rank` for it (a redone step: its last attempt)."""
    out = {}
    for line in (run / "audit" / f"rank{rank}.jsonl").read_text().splitlines():
        d = json.loads(line)
        out[d["step"]] = d
    return out


def _checkpoints(run: Path) -> list[int]:
    d = run / "checkpoint"
    return sorted(int(p.name.split("-")[1]) for p in d.glob("step-*") if (p / ".metadata").exists()) if d.exists() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    why = _netns_missing()
    if why is not None:
        skip_or_fail_netns(why)
    tmp = tmp_path_factory.mktemp("two_hosts")
    hosts = Hosts(tmp)
    try:
        try:
            hosts.up()
        except RuntimeError as e:  # e.g. veth pairs not allowed where namespaces are
            skip_or_fail_netns(f"cannot make the two nodes: {e}")
        out: dict = {"tmp": tmp}
        # one host, 4 ranks (node 0's namespace, loopback only)
        ref, log = tmp / "one_host", tmp / "one_host.log"
        p = hosts.start(0, [sys.executable, "-m", "titan_rw.torchrun", "--standalone", "--nproc-per-node=4",
                            "--local-addr=127.0.0.1",  # the workers' MASTER_ADDR (default: this host's name)
                            "-m", "titan_rw.train", "--config", "train_configs/debug_cpu.toml", *ARGS,
                            "--job.dump_folder", str(ref)], hosts.env(0, "lo"), log)
        assert _wait(p, 400, log, "the one-host run") == 0, log.read_text()[-4000:]
        out["ref"] = ref

        # two hosts; node 1 hangs after the step-2 checkpoint, then dies whole
        run = tmp / "two_hosts"
        logs = [tmp / "node0.a.log", tmp / "node1.a.log"]
        n1 = hosts.start_node(1, run, logs[1], "--fault_injection.hang_at_step", str(HANG_STEP))
        n0 = hosts.start_node(0, run, logs[0])
        deadline = time.monotonic() + 400
        marks = [f"rank {r} stops after step {HANG_STEP}" for r in (2, 3)]
        while not (HANG_STEP in _checkpoints(run) and all(m in logs[1].read_text() for m in marks)):
            assert n0.poll() is None and n1.poll() is None, (logs[0].read_text()[-3000:], logs[1].read_text()[-3000:])
            assert time.monotonic() < deadline, "node 1 never reached its hang\n" + logs[1].read_text()[-4000:]
            time.sleep(0.5)
        out["rows_before_kill"] = sorted(_metrics(run))
        t0 = time.monotonic()
        _kill_all_in(hosts.ns[1])
        out["node0_code"] = _wait(n0, HANG_BOUND_S, logs[0], "node 0's launcher after node 1 was killed")
        out["node0_exit_s"] = time.monotonic() - t0
        out["node1_code"] = n1.wait(timeout=30)
        out["node0_log_a"] = logs[0].read_text()

        # both nodes again: resume from the newest checkpoint
        logs = [tmp / "node0.b.log", tmp / "node1.b.log"]
        n1 = hosts.start_node(1, run, logs[1])
        n0 = hosts.start_node(0, run, logs[0])
        codes = [_wait(n0, 400, logs[0], "node 0 (resumed)"), _wait(n1, 400, logs[1], "node 1 (resumed)")]
        assert codes == [0, 0], (logs[0].read_text()[-4000:], logs[1].read_text()[-4000:])
        out["node0_log_b"] = logs[0].read_text()
        out["run"] = run
        print(f"\n[two hosts] node 0 exited {out['node0_exit_s']:.1f} s after node 1 was killed "
              f"(bound {HANG_BOUND_S} s)")
        yield out
    finally:
        hosts.down()


def test_two_hosts_equal_one_host_bit_for_bit(runs):
    ref, run = _metrics(runs["ref"]), _metrics(runs["run"])
    assert sorted(ref) == list(range(1, STEPS + 1)), sorted(ref)
    for s in range(1, STEPS + 1):
        for k in COMPARED:
            assert run[s][k] == ref[s][k], (s, k, run[s][k], ref[s][k])
    assert ref[STEPS]["temperature"] == 1.0 and ref[STEPS]["b"] == 8  # past the warm-up: LinUpper at r = 1


def test_ranks_of_the_second_host_apply_the_one_host_weights(runs):
    ref = {r: _audit(runs["ref"], r) for r in range(4)}
    two = {r: _audit(runs["run"], r) for r in (2, 3)}
    metrics = _metrics(runs["ref"])
    for s in range(1, STEPS + 1):
        for r in (2, 3):
            assert two[r][s]["dp_rank"] == r, two[r][s]
            assert two[r][s]["rows"] == ref[r][s]["rows"], (s, r)
            assert two[r][s]["weights"] == ref[r][s]["weights"], (s, r, two[r][s]["weights"], ref[r][s]["weights"])
        # the reference itself: the 4 ranks' weights are one group's (sum 1, its max is the logged max)
        every = [w for r in range(4) for w in ref[r][s]["weights"]]
        assert len(every) == 8 and abs(sum(every) - 1.0) < 1e-6, (s, every)
        assert max(every) == metrics[s]["max_weight"], s
    # a rank slicing by LOCAL_RANK (rank 2 taking rank 0's weights) would fail above: they differ
    assert any(ref[2][s]["weights"] != ref[0][s]["weights"] for s in range(2, STEPS + 1))
    assert all(ref[2][s]["rows"] != ref[0][s]["rows"] for s in range(1, STEPS + 1))


def test_losing_a_host_ends_the_other_and_both_resume(runs):
    assert runs["rows_before_kill"] == list(range(1, HANG_STEP + 1)), runs["rows_before_kill"]
    assert runs["node0_code"] != 0, runs["node0_log_a"][-3000:]  # a failure, not a finished run
    # (node 0 exiting within HANG_BOUND_S of the kill is enforced by the fixture: a hang fails there)
    assert "Training completed" not in runs["node0_log_a"]
    log = runs["node0_log_b"]
    assert f"resumed from the checkpoint of step {HANG_STEP}" in log, log[-4000:]
    from titan_rw.observability.jsonl import read_metrics

    rows = [r["step"] for r in read_metrics(str(runs["run"]))]
    assert rows == list(range(1, STEPS + 1)), rows  # every step's row, each once
    assert _checkpoints(runs["run"]) == [HANG_STEP, STEPS]
