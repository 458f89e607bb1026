"""Ports taken by someone else (issue 20 item 5).

Hosts report the listeners in their port ranges that are not agentd's; the
coordinator assigns none of them; a clash found at spawn time (the holder came
after the assignment) gets the replica new ports from the coordinator instead of
FATAL. Checked with real sockets, a real coordinator on a fake log, and real
agents with a real llama-server and a foreign listener in a small port range.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from agentd.coordinator import InstanceReport
from agentd.errors import NotAvailable
from agentd.inventory.change import material_changes
from agentd.inventory.ports import foreign_listeners
from agentd.testing.binaries import NO_LLAMA_CPP, llama_cpp_present
from agentd.testing.coordinator_world import World, host, spec
from agentd.types import HostInventory


def _listener(port: int = 0) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def test_listeners_in_the_ranges_are_reported_unless_agentd_owns_them():
    mine, other = _listener(), _listener()
    outside = _listener()
    try:
        p_mine, p_other = mine.getsockname()[1], other.getsockname()[1]
        ranges = [(p_mine, p_mine), (p_other, p_other)]  # exact: other tests' ports may lie between
        # A listener of another process (a child that holds a socket it bound) is foreign.
        child = subprocess.Popen([sys.executable, "-c", "import socket,sys,time; s=socket.socket(); "
                                  "s.bind(('127.0.0.1',0)); s.listen(); print(s.getsockname()[1], flush=True); "
                                  "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
        try:
            p_child = int(child.stdout.readline())
            got = foreign_listeners([*ranges, (p_child, p_child)], is_owned=lambda pid: pid == os.getpid())
            assert got == (p_child,)  # ours are not reported, the child's is, the one outside the ranges not
            assert foreign_listeners([(p_child, p_child)], is_owned=lambda pid: pid == child.pid) == ()
            assert set(foreign_listeners(ranges, is_owned=lambda pid: False)) == {p_mine, p_other}
        finally:
            child.kill()
            child.wait()
    finally:
        for s in (mine, other, outside):
            s.close()


def test_owners_are_looked_up_only_for_new_listeners(monkeypatch):
    """Finding a socket's process reads fd links: a voter of a large fleet holds thousands of sockets (issue 16).
    Only a listener not seen at the last call has its owner looked up; a closed one is gone at once."""
    from agentd.inventory import ports

    looked_up: list[set[int]] = []
    real = ports.socket_owners

    def counted(inodes: set[int], proc: str = "/proc") -> dict[int, int]:
        looked_up.append(set(inodes))
        return real(inodes, proc)

    monkeypatch.setattr(ports, "_last", None)
    monkeypatch.setattr(ports, "socket_owners", counted)
    a = _listener()
    try:
        pa, ia = a.getsockname()[1], os.fstat(a.fileno()).st_ino
        assert (pa, ia) in ports.listening_sockets([(pa, pa)])
        assert ports.foreign_listeners([(pa, pa)], lambda pid: False) == (pa,)
        assert ports.foreign_listeners([(pa, pa)], lambda pid: pid == os.getpid()) == ()  # ours: owner known
        assert looked_up == [{ia}]
        b = _listener()
        try:
            pb, ib = b.getsockname()[1], os.fstat(b.fileno()).st_ino
            assert ports.foreign_listeners([(pa, pa), (pb, pb)], lambda pid: False) == tuple(sorted((pa, pb)))
            assert ports.foreign_listeners([(pa, pa), (pb, pb)], lambda pid: pid == os.getpid()) == ()
            assert looked_up == [{ia}, {ib}]  # only the new one
        finally:
            b.close()
    finally:
        a.close()
    assert ports.foreign_listeners([(pa, pa)], lambda pid: False) == ()  # closed: nothing listens
    assert len(looked_up) == 2
    assert real({ia}) == {}  # a closed socket has no owner


def test_the_kernel_names_the_same_listeners_over_netlink_as_in_proc():
    """sock_diag lists only listeners (cheap with thousands of connected sockets); /proc is the fallback."""
    from agentd.inventory import ports

    a, b = _listener(), socket.socket(socket.AF_INET6)
    try:
        b.bind(("::1", 0))
        b.listen()
        want = {(s.getsockname()[1], os.fstat(s.fileno()).st_ino) for s in (a, b)}
        full = [(1, 65535)]
        netlink = ports.netlink_listeners()
        assert netlink is not None and want <= netlink  # IPv4 and IPv6
        assert want <= ports.proc_listeners(full)
        assert want <= ports.listening_sockets(full)
        connected = socket.create_connection(a.getsockname())
        try:  # a connected socket is no listener
            assert (connected.getsockname()[1], os.fstat(connected.fileno()).st_ino) not in ports.netlink_listeners()
        finally:
            connected.close()
    finally:
        a.close()
        b.close()


def test_an_unreadable_socket_table_reports_nothing_instead_of_failing():
    def broken(kind: str):
        raise PermissionError("no /proc")
    assert foreign_listeners([(1, 65535)], lambda pid: False, connections=broken) == ()


def test_a_change_of_foreign_ports_is_material_and_absent_when_empty():
    old = HostInventory(name="a")
    new = old.model_copy(update={"foreign_ports": (40001,)})
    assert material_changes(old, new) == ["ports held by other processes: none -> 40001"]
    assert "foreign_ports" not in old.model_dump(mode="json", exclude_defaults=False)
    assert HostInventory.model_validate_json(new.model_dump_json()).foreign_ports == (40001,)


async def test_the_coordinator_skips_ports_a_host_reports_taken(placer, models):
    w = World(placer, [host("a", gpus=2)], port_range=(40000, 40003))
    w.hosts["a"] = w.hosts["a"].model_copy(update={"foreign_ports": (40000, 40002)})
    w.start()
    await w.coord.deploy(spec("one", models["tiny"]))
    await w.coord.deploy(spec("two", models["tiny"]))
    ports = sorted(ep.port for a in w.state.all_assignments() for ep in a.endpoints)
    assert ports == [40001, 40003]
    w.hosts["a"] = w.hosts["a"].model_copy(update={"foreign_ports": (40000, 40001, 40002, 40003)})
    w.report("a")
    await w.coord.delete("two")
    with pytest.raises(NotAvailable, match="no free port left in 40000-40003"):
        await w.coord.deploy(spec("three", models["tiny"]))


async def test_a_clash_at_spawn_gets_new_ports_from_the_coordinator_in_a_new_generation(placer, models):
    w = World(placer, [host("a")]).start()
    await w.coord.deploy(spec("chat", models["tiny"]))
    (a,) = w.state.assignments_for("chat")
    port = a.endpoints[0].port
    # The host says: my part's port is held by someone else (and now lists it as taken).
    w.hosts["a"] = w.hosts["a"].model_copy(update={"foreign_ports": (port,)})
    report = InstanceReport(instance_id=a.instance_id, deployment="chat", replica=0, generation=a.generation,
                            part=0, host="a", role="main", state="BACKOFF", reason="port in use",
                            endpoint=f"127.0.0.1:{port}", term=a.term, port_in_use=port)
    w.report("a", instances={"a": [report]})
    w.raft.term = 4
    decisions = await w.coord.tick()
    (b,) = w.state.assignments_for("chat")
    assert (b.generation, b.term) == (a.generation + 1, 4) and b.instance_id != a.instance_id
    assert b.endpoints[0].port != port and b.plan == a.plan
    assert any(f"port {port} on a held by another process: new ports as {b.instance_id}" in d for d in decisions)
    # The old instance's report is stale now: nothing more happens.
    w.clock.advance(5)
    assert not [d for d in await w.coord.tick() if "held by another process" in d]
    assert w.state.assignments_for("chat") == [b]




@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.skipif(not llama_cpp_present(), reason=NO_LLAMA_CPP)
def test_real_agents_skip_a_foreign_listener_and_move_a_part_whose_port_was_taken_before_it_started(tmp_path):
    import json
    import signal

    from agentd.testing.gguf import write_tiny_llama_gguf
    from agentd.testing.localcluster import LocalCluster, free_port_block, running, simulated_host, wait_for
    from agentd.v1 import control_pb2 as pb

    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    base = free_port_block()
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host(n, gpus=1, gpu_gib=8) for n in "abc"],
                     extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 5}]", "AGENTD_RUNTIME_STOP_GRACE": "1s",
                                "AGENTD_INVENTORY_REFRESH": "1s"})

    def deploy(name: str) -> pb.DeployReply:
        with c.agents["a"].client(timeout=60) as client:
            return client.deploy(pb.DeploymentSpec(name=name, model=str(model), runtime="llamabox", replicas=1,
                                                   options=pb.RuntimeOptions(ctx_size=256),
                                                   pin=[pb.GpuPin(host="b")]))

    def foreign_ports(node: str) -> set[int]:
        with c.agents["a"].client(timeout=5) as client:
            nodes = {n.name: n for n in client.call("ListNodes", pb.ListNodesRequest()).nodes}
        return set(json.loads(nodes[node].inventory_json or "{}").get("foreign_ports", []))

    squatter = _listener(base)  # a leftover server on the first port of the range
    late = None
    try:
        c.start()
        c.wait_for_inventories()
        wait_for(lambda: base in foreign_ports("b"), 30, "b to report the foreign listener")
        one = deploy("one")
        port_one = json.loads(one.deployment.assignments_json)[0]["endpoints"][0]["port"]
        assert port_one != base
        wait_for(lambda: running(c, "a", "one"), 90, "one running")

        # b is frozen between the assignment and its spawn (a and c keep the quorum); meanwhile someone takes
        # the assigned port.
        c.kill("b", signal.SIGSTOP)
        try:
            two = deploy("two")
            (a2,) = json.loads(two.deployment.assignments_json)
            taken = a2["endpoints"][0]["port"]
            assert taken not in (base, port_one)
            late = _listener(taken)
        finally:
            c.kill("b", signal.SIGCONT)
        rows = wait_for(lambda: running(c, "a", "two"), 90, "two running on a new port")
        assert rows[0].generation == a2["generation"] + 1 and rows[0].endpoint != f"127.0.0.1:{taken}"
        with c.agents["a"].client(timeout=5) as client:
            (now,) = json.loads(client.call("Get", pb.GetRequest(name="two")).assignments_json)
        assert now["endpoints"][0]["port"] not in (base, port_one, taken)
        log = c.agents["b"].log_file.read_text()
        assert f"port {taken} on 127.0.0.1 is already in use" in log
        assert "FATAL" not in " ".join(line for line in log.splitlines() if "two-r0" in line)
        leader_log = c.agents["a"].log_file.read_text()
        assert f"port {taken} on b held by another process: new ports as two-r0-g2" in leader_log
    finally:
        c.stop()
        squatter.close()
        if late is not None:
            late.close()
