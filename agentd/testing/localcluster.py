"""A cluster of real `agentd serve` processes on loopback, with simulated GPUs.

The end-to-end tests, the failover benchmark and the demo all use this, so
the cluster they exercise is the one users run: separate processes, real gRPC
on 127.0.0.1, state on disk, inventories from `--simulate` files.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from agentd.api.client import ClientAuth, ControlClient
from agentd.api.drain import request_drain
from agentd.errors import AgentdError, NotAvailable
from agentd.runtime.standalone import kill_recorded
from agentd.runtime.strays import OWNER_DATA_DIR
from agentd.security.files import open_private, private_dir
from agentd.v1 import control_pb2 as pb

GiB = 1024**3
DEFAULT_MAX_VOTERS = 5  # Settings.max_voters' default: the first five agents vote
DEFAULT_STANDBY_LEARNERS = 2  # Settings.standby_learners' default: then every other agent is a watcher
CLUSTER_MARK = "LOCALCLUSTER_ROOT"  # not AGENTD_*: the agent's settings own that prefix
# Clusters that started an agent and have not been stopped (with drain) since, by `serial` (1, 2, ... in order of
# construction): tests/conftest.py stops those a test body made and left running, e.g. after a failure outside
# any `with`.
STARTED: dict[int, LocalCluster] = {}
_last_serial = 0


def last_serial() -> int:
    """The serial of the last LocalCluster made in this process (0: none yet)."""
    return _last_serial
_PARTITION_LINE = '"msg":"fault injection: partition"'


_handed_out: set[int] = set()


@functools.cache
def compile_sources() -> None:
    """Write the bytecode of agentd and the plugins beside their sources, once per process.

    Where PYTHONDONTWRITEBYTECODE is set (as on the CI machines) nothing writes it, so every agent compiled
    agentd's ~140 modules from source at each start: about 0.45 s of CPU in an import of about 1.9 s, measured
    at load 35 on 2 cores, where it is 5-10 s of wall clock per (re)started agent. Python still reads bytecode
    it did not write, and checks it against the source's mtime and size, so an edited file is compiled again
    in memory, never run stale. __pycache__ is in .gitignore."""
    import compileall

    package = Path(__file__).resolve().parents[1]  # agentd/
    dirs = [package, *sorted(package.parent.glob("plugins/*/agentd_*"))]
    for d in dirs:
        with contextlib.suppress(OSError):
            compileall.compile_dir(str(d), quiet=2, workers=1)


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range (10000-20000; free_port_block takes 20000-32000).
    A port the kernel picks for bind(0) is an ephemeral one, which the agents' own outgoing connections may
    take before the agent that was given it binds: an 8-agent test lost a watcher that way ("address
    already in use" for its HTTP port)."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(10000, 20000)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise NotAvailable("no free port between 10000 and 20000")


def free_port_block(size: int = 100, rng: random.Random | None = None) -> int:
    """The first of `size` consecutive ports that are free now, from a random start (20000-32000, below the
    ephemeral range): model-server port ranges for tests and benchmarks. A block derived from the pid was the
    same for every test of one pytest process, so one test's lingering server or TIME_WAIT hit the next."""
    rng = rng or random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - size)
        for port in range(base, base + size):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    break
        else:
            return base
    raise NotAvailable(f"no {size} consecutive free ports between 20000 and 32000")


def simulated_host(name: str, gpus: int = 2, gpu_gib: float = 24.0, used_gib: float = 0.0,
                   labels: dict[str, str] | None = None, memory_gib: float = 64.0,
                   gpu_name: str = "NVIDIA GeForce RTX 4090 (simulated)") -> dict[str, Any]:
    """A host inventory (DESIGN.md §5) with `gpus` identical simulated GPUs."""
    return {
        "name": name, "labels": labels or {}, "cpu_count": 16,
        "memory_total": int(memory_gib * GiB), "memory_available": int(memory_gib * GiB * 0.9),
        "gpus": [{"index": i, "uuid": f"GPU-sim-{name}-{i}", "name": gpu_name, "vendor": "nvidia",
                  "memory_total": int(gpu_gib * GiB), "memory_used": int(used_gib * GiB),
                  "utilization": 0.0, "compute_capability": "8.9"} for i in range(gpus)],
    }


@dataclass
class Agent:
    name: str
    listen: str
    http_listen: str
    data_dir: Path
    inventory_file: Path
    log_file: Path
    proc: subprocess.Popen | None = None
    auth: ClientAuth | None = None  # secure clusters: the admin certificate's credentials
    token_listen: str = ""  # secure clusters: the token port (TLS without client certificate: joins, bearer tokens)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    def client(self, timeout: float = 30.0) -> ControlClient:
        return ControlClient(self.listen, timeout=timeout, auth=self.auth)


@dataclass
class LocalCluster:
    root: Path
    hosts: list[dict[str, Any]]
    election_timeout: str = ""  # e.g. "500ms"; empty = the default
    node_down_grace: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    agents: dict[str, Agent] = field(default_factory=dict)
    # Per-agent environment on top of extra_env (e.g. one host with a broken runtime binary); read at each
    # start, so a test can change it and restart() the agent.
    agent_env: dict[str, dict[str, str]] = field(default_factory=dict)
    # Test-only fault injection: each agent follows its own fault file (see `partition`).
    faults: bool = False
    # Mutual TLS and authentication (docs/security.md): the first agent gets the CA (as `agentd init-ca`
    # makes it), the others join with one-time tokens; clients use an admin certificate in `admin_dir`.
    secure: bool = False
    # Raft seats (docs/cluster.md): voters, then standby learners; every further agent is a watcher.
    max_voters: int = DEFAULT_MAX_VOTERS
    standby_learners: int = DEFAULT_STANDBY_LEARNERS
    # Per-agent command prefix (e.g. `unshare -m sh -c 'mount a small tmpfs on the data dir && exec "$@"'`,
    # to fill one agent's disk); it must exec the agent so that the process keeps its pid.
    agent_prefix: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        global _last_serial
        _last_serial += 1
        self.serial = _last_serial
        self.root.mkdir(parents=True, exist_ok=True)
        for host in self.hosts:
            name = host["name"]
            inv = self.root / f"{name}.inventory.json"
            inv.write_text(json.dumps(host, indent=2))
            self.agents[name] = Agent(
                name=name, listen=f"127.0.0.1:{free_port()}", http_listen=f"127.0.0.1:{free_port()}",
                data_dir=self.root / name, inventory_file=inv, log_file=self.root / f"{name}.log")
            if self.secure:  # explicit: listen port + 1 (the default) may be taken by something else
                self.agents[name].token_listen = f"127.0.0.1:{free_port()}"

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 60.0) -> LocalCluster:
        """Start the first agent (it bootstraps), wait for it to lead, then start the others.

        Returns once the leader has promoted the joiners to voters (up to the default 5): they join as
        learners, and until then the first agent is the only voter, so killing it would leave the
        cluster without a quorum."""
        names = list(self.agents)
        if self.secure:
            self.init_ca(names[0])
        self.start_agent(names[0], join=[])
        self.wait_for_leader(timeout)
        for name in names[1:]:
            self.start_agent(name)
        members = min(len(names), self.max_voters + self.standby_learners)
        self.wait_for_members(members, timeout)
        self.wait_for_members(min(len(names), self.max_voters), timeout, voters=True)
        if members < len(names):
            self.wait_for_followers(timeout)
        return self

    def start_agent(self, name: str, join: list[str] | None = None) -> Agent:
        agent = self.agents[name]
        if agent.alive:
            return agent
        if join is None:
            join = [a.listen for a in self.agents.values() if a.name != name]
        private_dir(agent.data_dir)
        argv = [sys.executable, "-m", "agentd", "serve", "--node-name", name, "--listen", agent.listen,
                "--http-listen", agent.http_listen, "--data-dir", str(agent.data_dir),
                "--simulate", str(agent.inventory_file), "--log-format", "json", "--insecure"]
        if join:
            argv += ["--join", ",".join(join)]
        if self.election_timeout:
            argv += ["--election-timeout", self.election_timeout]
        if self.node_down_grace:
            argv += ["--node-down-grace", self.node_down_grace]
        if self.secure:
            argv.remove("--insecure")
            if join and not (agent.tls_dir / "node.crt").exists():
                # The token goes to the peers' token ports; the signer's answer names their gRPC ports.
                tokens = [a.token_listen for a in self.agents.values() if a.listen in join and a.token_listen]
                argv[argv.index("--join") + 1] = ",".join(tokens or join)
                argv += ["--token", self.create_token(name)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
        env.update({"AGENTD_CONFIG": str(self.root / "none.toml"), "PYTHONUNBUFFERED": "1"})
        if self.max_voters != DEFAULT_MAX_VOTERS:
            env["AGENTD_MAX_VOTERS"] = str(self.max_voters)
        if self.standby_learners != DEFAULT_STANDBY_LEARNERS:
            env["AGENTD_STANDBY_LEARNERS"] = str(self.standby_learners)
        (self.root / "none.toml").touch()
        env.update(self.extra_env)
        env["AGENTD_TEST_HOOKS"] = "agentd.testing.agent_hooks"  # the faults and clocks below (a test's own too)
        env[CLUSTER_MARK] = self.mark  # inherited by whatever the agent starts: `reap` finds it by this
        if self.faults:
            env["AGENTD_TEST_FAULT_FILE"] = str(self.fault_file(name))
        env.update(self.agent_env.get(name, {}))
        if self.secure and agent.token_listen:
            env["AGENTD_TOKEN_LISTEN"] = agent.token_listen
        argv = [*self.agent_prefix.get(name, []), *argv]
        if env.get("PYTHONDONTWRITEBYTECODE"):
            compile_sources()
        log = open_private(agent.log_file, os.O_WRONLY | os.O_APPEND)  # the child owns it for its lifetime
        # Not the caller's directory: `python -m` puts the working directory first on sys.path, ahead of
        # PYTHONPATH, and an agent given another release's code in agent_env must import that code.
        agent.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                      start_new_session=True)
        STARTED[self.serial] = self
        os.close(log)
        return agent

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        agent = self.agents[name]
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                agent.proc.wait(timeout=30)

    def restart(self, name: str) -> Agent:
        self.kill(name, signal.SIGTERM)
        return self.start_agent(name)

    def stop(self, timeout: float = 30.0, *, drain: bool = True) -> None:
        """SIGTERM every agent. With `drain` (the default), each stops its model servers first
        (through the drain-on-stop file, as an operator would), and whatever an agent killed
        earlier left behind is killed from its process records: nothing outlives the cluster."""
        for agent in self.agents.values():
            if agent.alive:
                if drain:
                    request_drain(agent.data_dir)
                agent.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for agent in self.agents.values():
            if agent.proc is None:
                continue
            try:
                agent.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(agent.proc.pid, signal.SIGKILL)
                agent.proc.wait(timeout=10)
        if drain:
            kill_recorded(self.root)
            self.reap()
            STARTED.pop(self.serial, None)

    @property
    def mark(self) -> str:
        """The value of CLUSTER_MARK in this cluster's agents' environment (and so in their children's)."""
        return str(self.root.resolve())

    def leftovers(self) -> list[psutil.Process]:
        """Every live process this cluster's agents started, directly or not, and the agents themselves: those
        that carry CLUSTER_MARK or an owner data directory (agentd.runtime.strays) under `root`, and their
        descendants. Model servers live in sessions of their own, so an agent killed with -9 leaves them
        running, and a lost record no longer names them; their environment still does."""
        mark, me = self.mark, os.getpid()
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["pid"]):
            if p.pid == me:
                continue
            try:
                env = p.environ()  # other users' processes are unreadable, and not ours anyway
            except (psutil.Error, OSError):
                continue
            owner = env.get(OWNER_DATA_DIR, "")
            if env.get(CLUSTER_MARK) == mark or owner == mark or owner.startswith(mark + os.sep):
                found[p.pid] = p
                with contextlib.suppress(psutil.Error):
                    found.update((c.pid, c) for c in p.children(recursive=True) if c.pid != me)
        return sorted(found.values(), key=lambda p: p.pid)

    def reap(self, timeout: float = 10.0) -> list[int]:
        """SIGKILL every `leftovers()` process and wait for them to be gone; the pids killed. `stop()` calls it,
        so nothing a test started outlives its cluster, whatever the test killed or deleted on the way."""
        killed: list[int] = []
        for _ in range(3):  # a parent killed in the same sweep may have forked meanwhile: look again
            procs = self.leftovers()
            if not procs:
                break
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    p.kill()
                    killed.append(p.pid)
            psutil.wait_procs(procs, timeout=timeout)
        for agent in self.agents.values():
            if agent.proc is not None:
                agent.proc.poll()  # our own children: reaped, not left as zombies
        return sorted(set(killed))

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ security (secure=True)

    @property
    def admin_dir(self) -> Path:
        """admin.crt, admin.key and ca.crt: point AGENTD_TLS_DIR here to use the CLI against this cluster."""
        return self.root / "admin"

    def init_ca(self, name: str) -> str:
        """What `agentd init-ca` does on the first host, plus an admin certificate; returns the CA pin."""
        from agentd.security.ca import ROLE_ADMIN, ROLE_NODE, init_ca, issue_identity, load_ca, save_identity
        from agentd.security.channel import channel_options
        from agentd.security.tls import client_credentials_from_dir

        agent = self.agents[name]
        if not (agent.tls_dir / "ca.key").exists():
            init_ca(agent.tls_dir)
            ca = load_ca(agent.tls_dir, need_key=True)
            save_identity(agent.tls_dir, "node", issue_identity(ca, name, role=ROLE_NODE, addresses=["127.0.0.1"]))
            save_identity(self.admin_dir, ROLE_ADMIN, issue_identity(ca, "admin", role=ROLE_ADMIN))
        auth = ClientAuth(client_credentials_from_dir(self.admin_dir, ROLE_ADMIN), tuple(channel_options()),
                          "admin certificate")
        for a in self.agents.values():
            a.auth = auth
        return load_ca(agent.tls_dir).fingerprint

    def create_token(self, node_name: str = "", ttl: float = 600.0) -> str:
        """A one-time join token from the running cluster (through any live agent, as an admin)."""
        from agentd.v1 import security_pb2 as sec_pb

        errors = []
        for agent in self.alive_agents():
            try:
                with agent.client(timeout=10.0) as c:
                    return c.call("CreateJoinToken", sec_pb.CreateJoinTokenRequest(
                        ttl_seconds=ttl, node_name=node_name, any_node=not node_name,
                        description=f"LocalCluster {node_name}")).token
            except AgentdError as exc:
                errors.append(f"{agent.name}: {exc}")
        raise NotAvailable("no agent could create a join token: " + "; ".join(errors))

    # ------------------------------------------------------------------ queries

    def alive_agents(self) -> list[Agent]:
        return [a for a in self.agents.values() if a.alive]

    def leader(self) -> tuple[str, int] | None:
        """(leader name, term) as the live agents agree on it, or None."""
        seen: dict[tuple[str, int], int] = {}
        for agent in self.alive_agents():
            try:
                with agent.client(timeout=1.0) as c:
                    r = c.leader()
            except AgentdError:
                continue
            if r.leader_id and r.leader_id in self.agents and self.agents[r.leader_id].alive:
                seen[(r.leader_id, r.term)] = seen.get((r.leader_id, r.term), 0) + 1
        if not seen:
            return None
        return max(seen, key=lambda k: (k[1], seen[k]))

    def wait_for_leader(self, timeout: float = 30.0, not_: str | None = None) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lead = self.leader()
            if lead and lead[0] != not_:
                return lead
            self._check_alive()
            time.sleep(0.05)
        raise NotAvailable(f"no leader within {timeout:g}s; logs in {self.root}")

    def wait_for_members(self, count: int, timeout: float = 30.0, *, voters: bool = False) -> None:
        """Until the leader counts `count` members (learners included), or `count` voters with `voters`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lead = self.leader()
            if lead:
                try:
                    with self.agents[lead[0]].client(timeout=2.0) as c:
                        members = c.status().members
                    if sum(1 for m in members if m.voter or not voters) >= count:
                        return
                except AgentdError:
                    pass
            self._check_alive()
            time.sleep(0.1)
        what = "voters" if voters else "members"
        raise NotAvailable(f"cluster did not reach {count} {what} within {timeout:g}s; logs in {self.root}")

    def wait_for_followers(self, timeout: float = 30.0) -> None:
        """Until every live agent follows a leader: members through Raft, watchers through a voter's stream."""
        deadline = time.monotonic() + timeout
        waiting = {a.name for a in self.alive_agents()}
        while waiting and time.monotonic() < deadline:
            for name in sorted(waiting):
                try:
                    with self.agents[name].client(timeout=1.0) as c:
                        if c.status().leader_id:
                            waiting.discard(name)
                except AgentdError:
                    pass
            self._check_alive()
            time.sleep(0.1)
        if waiting:
            raise NotAvailable(f"agents {sorted(waiting)} follow no leader after {timeout:g}s; logs in {self.root}")

    def wait_for_inventories(self, timeout: float = 30.0) -> None:
        """Until the leader holds every agent's inventory report: placement only sees hosts that reported,
        and a host that has just joined reports within about a second."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lead = self.leader()
            if lead:
                try:
                    with self.agents[lead[0]].client(timeout=2.0) as c:
                        nodes = c.nodes()
                    if {n.name for n in nodes if n.inventory_json and n.state == "up"} >= set(self.agents):
                        return
                except AgentdError:
                    pass
            self._check_alive()
            time.sleep(0.1)
        raise NotAvailable(f"not every agent reported its inventory within {timeout:g}s; logs in {self.root}")

    # ------------------------------------------------------------------ fault injection

    def fault_file(self, name: str) -> Path:
        """The file agent `name` follows for injected faults (with `faults=True`)."""
        return self.root / f"{name}.faults.json"

    def partition(self, *groups: list[str] | tuple[str, ...] | set[str], timeout: float = 10.0) -> None:
        """Cut Raft traffic between the groups (agents in no group are cut from everyone); no arguments heals.

        Returns once every live agent whose cut changed has logged that it applied it: the agents poll
        their files, and a test must not race the cut it just asked for.
        """
        if not self.faults:
            raise NotAvailable("this LocalCluster was created without faults=True")
        names = list(self.agents)
        group_of = {n: frozenset(g) for g in groups for n in g}
        waiting = {}
        for name in names:
            mine = group_of.get(name, frozenset({name})) if groups else frozenset(names)
            peers = sorted(n for n in names if n not in mine)
            path = self.fault_file(name)
            old = json.loads(path.read_text()).get("partition", []) if path.exists() else []
            if sorted(old) == peers:
                continue
            if self.agents[name].alive:  # counted first: the agent may apply it the moment it is written
                waiting[name] = self._count_in_log(name, _PARTITION_LINE)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"partition": peers}))
            tmp.replace(path)  # atomic: the agent never reads half a file
        deadline = time.monotonic() + timeout
        while waiting:
            for name, before in list(waiting.items()):
                if self._count_in_log(name, _PARTITION_LINE) > before or not self.agents[name].alive:
                    del waiting[name]
            if time.monotonic() > deadline:
                raise NotAvailable(f"agents {sorted(waiting)} did not apply the partition within {timeout:g}s")
            time.sleep(0.02)

    def heal(self, timeout: float = 10.0) -> None:
        """Remove every injected partition."""
        self.partition(timeout=timeout)

    def _count_in_log(self, name: str, needle: str) -> int:
        path = self.agents[name].log_file
        return path.read_text(errors="replace").count(needle) if path.exists() else 0

    def _check_alive(self) -> None:
        for agent in self.agents.values():
            if agent.proc is not None and agent.proc.poll() not in (None, -signal.SIGKILL, -signal.SIGTERM, 0):
                tail = agent.log_file.read_text(errors="replace")[-3000:]
                raise AgentdError(f"agent {agent.name} exited with {agent.proc.returncode}:\n{tail}")

    def any_client(self, timeout: float = 30.0) -> ControlClient:
        for agent in self.alive_agents():
            return agent.client(timeout=timeout)
        raise NotAvailable("no agent is alive")

    def logs(self) -> Iterator[tuple[str, str]]:
        for agent in self.agents.values():
            if agent.log_file.exists():
                yield agent.name, agent.log_file.read_text(errors="replace")


# ---------------------------------------------------------------------- waiting on a cluster, for tests

T = TypeVar("T")


def wait_for(fn: Callable[[], T | None], timeout: float, what: str) -> T:
    """`fn()`'s first truthy value, polled every 0.2 s; an agentd error counts as not yet. AssertionError naming
    `what` and the last error after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = fn()
        except AgentdError as exc:
            value, last = None, exc
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last error: {last})")


def running(c: LocalCluster, via: str, name: str) -> list[pb.Instance]:
    """Deployment `name`'s instances as `via` sees them, once every one is RUNNING; [] before."""
    with c.agents[via].client(timeout=5) as client:
        rows = list(client.call("ListInstances", pb.ListInstancesRequest(deployment=name)).instances)
    return rows if rows and all(i.state == "RUNNING" for i in rows) else []


def status(c: LocalCluster, via: str) -> pb.StatusReply:
    with c.agents[via].client(timeout=5) as client:
        return client.status()
