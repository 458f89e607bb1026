"""Reports through a voter (docs/cluster.md, issue 16 item 1), with real agents: 3 voters and 3 watchers,
insecure and with mutual TLS.

* A watcher's reports reach the leader through the follower voter it watches from; `agentd nodes` says
  which (VIA, reports_via) and which voter the watcher watches from (WATCHES, watches_from).
* kill -9 of that voter: the watcher's reports move (to another voter, or to the leader itself) with its lease
  intact - it is never marked down, while the killed voter is, after the same grace.
* A watcher cannot forward reports: the leader refuses RelayReports from a host that is not a voter (with
  mTLS, from the watcher's own certificate; also when it claims to be a voter).
"""

from __future__ import annotations

import json
import signal
import time

import grpc
import pytest

from agentd.testing.localcluster import LocalCluster, simulated_host
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

VOTERS = ("v1", "v2", "v3")
WATCHERS = ("w1", "w2", "w3")
GRACE = 6.0


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            got = fn()
            if got:
                return got
        except Exception as exc:  # an agent between lives: ask again
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last error: {last!r})")


def nodes(c: LocalCluster, leader: str) -> dict[str, pb.Node]:
    with c.agents[leader].client(timeout=5) as client:
        return {n.name: n for n in client.call("ListNodes", pb.ListNodesRequest()).nodes}


def relay_refusal(c: LocalCluster, leader: str, *, relay: str, as_host: str) -> tuple[grpc.StatusCode, str]:
    """RelayReports on the leader, claiming to be `relay`, with `as_host`'s certificate (secure clusters)."""
    address = c.agents[leader].listen
    if c.secure:
        from agentd.security.channel import channel_options
        from agentd.security.tls import client_credentials_from_dir
        creds = client_credentials_from_dir(c.agents[as_host].tls_dir, "node")
        channel = grpc.secure_channel(address, creds, options=channel_options())
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        update = pb.ReportUpdate(node="v9", address="127.0.0.1:1", inventory_json="{}", agent_version="9.9.9")
        replies = pb_grpc.AgentStub(channel).RelayReports(iter([pb.RelayBatch(relay=relay, updates=[update],
                                                                              live=["v9"])]), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(replies)
        return err.value.code(), err.value.details()


@pytest.mark.parametrize("secure", [False, True], ids=["insecure", "mtls"])
def test_a_watcher_reports_through_its_voter_and_its_reports_move_when_that_voter_dies(tmp_path, secure):
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host(n, gpus=1) for n in (*VOTERS, *WATCHERS)],
                     max_voters=3, standby_learners=0, secure=secure, node_down_grace=f"{GRACE:g}s",
                     extra_env={"AGENTD_VOTERS": ",".join(VOTERS)})
    try:
        c.start(timeout=120)
        leader = c.wait_for_leader(60)[0]
        followers = [v for v in VOTERS if v != leader]
        name_of = {c.agents[v].listen: v for v in VOTERS}

        def relayed() -> dict[str, str] | None:
            got = {w: n.reports_via for w, n in nodes(c, leader).items() if w in WATCHERS}
            if len(got) < len(WATCHERS) or not all(v in followers for v in got.values()):
                return None
            # ... by the voter it watches from, when that one does not lead. A voter that refused a host at
            # start-up (it relays only once the leader answered it) is avoided for RelayChoice.AVOID seconds,
            # meanwhile another follower relays; then the host goes back to its own.
            for w, v in got.items():
                with c.agents[w].client(timeout=5) as client:
                    if name_of.get(client.status().watching) not in (v, leader):
                        return None
            return got

        via = wait_for(relayed, 60, "every watcher's reports relayed by the follower voter it watches from")
        wait_for(lambda: {n.state for n in nodes(c, leader).values()} == {"up"}, 30, "every host up")

        # `agentd nodes` shows how each host reports, and which voter a watcher watches from (as it told the
        # leader); voters report to the leader themselves.
        def watching() -> dict[str, str]:
            out = {}
            for w in WATCHERS:
                with c.agents[w].client(timeout=5) as client:
                    out[w] = name_of.get(client.status().watching, "")
            return out

        def shown() -> list[dict] | None:
            env = {"HOME": str(tmp_path)}
            if secure:
                env["AGENTD_TLS_DIR"] = str(c.admin_dir)
            r = run_cli("nodes", "--json", "--server", c.agents[leader].listen, env=env)
            assert r.returncode == 0, r.stderr
            listed = {n["name"]: n for n in json.loads(r.stdout)["nodes"]}
            want = watching()
            ok = all(listed[w]["watches_from"] == want[w] != "" for w in WATCHERS)
            return [listed, r] if ok else None

        listed, _ = wait_for(shown, 30, "every watcher's voter in agentd nodes --json")
        for v in VOTERS:
            assert (listed[v]["reports_via"], listed[v]["watches_from"]) == ("", ""), listed[v]
        for w in WATCHERS:
            assert listed[w]["reports_via"] in followers and listed[w]["role"] == "watcher", listed[w]
        env = {"HOME": str(tmp_path), **({"AGENTD_TLS_DIR": str(c.admin_dir)} if secure else {})}
        table = run_cli("nodes", "--server", c.agents[leader].listen, env=env).stdout
        header = table.splitlines()[0]
        assert header.split()[3:6] == ["ROLE", "VIA", "WATCHES"], table
        for line in table.splitlines()[1:]:
            cells = line.split()
            if cells[0] in VOTERS:
                assert cells[4:6] == (["-", "-"] if cells[0] == leader else ["direct", "-"]), table

        # A host that is not a voter may not relay (claiming itself, or a voter's name with its certificate).
        code, why = relay_refusal(c, leader, relay="w1", as_host="w1")
        assert code == grpc.StatusCode.PERMISSION_DENIED and "only voters relay" in why, why
        if secure:
            code, why = relay_refusal(c, leader, relay=followers[0], as_host="w1")
            assert code == grpc.StatusCode.PERMISSION_DENIED and "may not relay as" in why, why
        assert "v9" not in nodes(c, leader)

        # kill -9 the voter that relays w's reports: they move, and w is never down.
        w = WATCHERS[0]
        dead = via[w]
        before = len(c.agents[leader].log_file.read_text(errors="replace"))
        c.kill(dead, signal.SIGKILL)
        deadline = time.monotonic() + 3 * GRACE
        moved = False
        while time.monotonic() < deadline:
            try:
                now = nodes(c, leader)
            except Exception:
                time.sleep(0.2)
                continue
            assert now[w].state == "up" and now[w].last_seen_seconds < GRACE, now[w]
            moved = moved or now[w].reports_via != dead
            time.sleep(0.3)
        assert moved
        final = nodes(c, leader)
        assert final[dead].state == "down"  # the same grace marks the dead voter down
        assert {final[x].state for x in WATCHERS} == {"up"}
        assert final[w].reports_via in ("", *[v for v in VOTERS if v != dead])
        # It watches from a live voter now, and told the leader so.
        wait_for(lambda: nodes(c, leader)[w].watches_from in [v for v in VOTERS if v != dead], 30,
                 f"{w} shown watching from a live voter")
        text = c.agents[leader].log_file.read_text(errors="replace")[before:]
        assert not any(f'"host {x} silent' in text for x in WATCHERS)
    finally:
        c.stop(drain=False)
