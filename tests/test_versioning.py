"""Versions (docs/versioning.md): the rules, one test each, without real processes.

The clusters of two releases (v0.1.0 from its tag and this one) are in
tests/test_upgrade.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from agentd import datadir, formats
from agentd.cluster.raft import RaftNode, RaftOptions
from agentd.cluster.state import (
    ClusterState,
    cluster_format_command,
    delete_command,
    deploy_command,
    secret_init_command,
)
from agentd.coordinator import Coordinator
from agentd.errors import ConfigError, UpgradeRequired
from agentd.types import DeploymentSpec, HostInventory
from agentd.version import (
    AGENT_VERSION,
    DATA_FORMAT,
    STATE_FORMAT,
    PeerVersion,
    Version,
    incompatibility,
    info,
)

SECRET = "s" * 40


def spec(name: str = "m", **kw) -> DeploymentSpec:
    return DeploymentSpec(name=name, model="/models/m.gguf", runtime="llamabox", **kw)


def future_command(op: str = "delete", v: int = STATE_FORMAT + 1, **fields) -> bytes:
    """What a later release writes: an entry that says it needs a newer format."""
    return json.dumps({"op": op, "v": v, **fields}).encode()


# ---------------------------------------------------------------- release numbers


def test_versions_one_minor_apart_work_together_and_two_do_not():
    assert incompatibility("0.2.0", "0.1.0") == ""
    assert incompatibility("0.2.0", "0.3.7") == ""
    assert incompatibility("0.2.0", "0.2.0+dev") == ""
    why = incompatibility("0.3.0", "0.1.0")
    assert "agentd 0.3.0" in why and "agentd 0.1.0" in why and "one minor version at a time" in why
    assert incompatibility("1.2.0", "0.2.0") != ""  # another major version
    assert "unreadable" in incompatibility("0.2.0", "banana")


def test_version_parse_refuses_what_is_not_a_version():
    assert Version.parse("0.2.0rc1") == Version(0, 2, 0)
    for bad in ("", "1.2", "1.2.3.4", "a.b.c", "1.2.x"):
        with pytest.raises(ValueError):
            Version.parse(bad)


def test_the_package_metadata_and_the_code_name_the_same_release():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert f'version = "{AGENT_VERSION}"' in text
    assert info() == {"version": AGENT_VERSION, "state_format": STATE_FORMAT, "wire_version": 2,
                      "data_format": DATA_FORMAT}


def test_a_peer_that_says_nothing_is_agentd_0_1_0():
    old = PeerVersion.reported()
    assert (old.version, old.state_format, old.wire_version) == ("0.1.0", 1, 1)


# ---------------------------------------------------------------- values for older readers


def test_new_fields_at_their_default_are_not_written_so_0_1_0_reads_them():
    data = formats.dump(spec(), STATE_FORMAT)
    assert "parallelism" not in data
    assert formats.needed_format(spec()) == 1


def test_a_new_field_in_use_needs_its_format_and_an_older_reader_gets_it_left_out():
    s = spec(parallelism="latency")
    assert formats.needed_format(s) == 2
    assert formats.dump(s, 2)["parallelism"] == "latency"
    assert "parallelism" not in formats.dump(s, 1)


def test_every_field_added_after_0_1_0_is_left_out_at_its_default_by_pydantic_too():
    """formats.dump hands a value to pydantic's own dump when the reader knows every field: that is only right
    if each versioned field drops its default itself (exclude_if), as 0.1.0's readers need."""
    import inspect

    from agentd import types

    models = [m for _, m in inspect.getmembers(types, inspect.isclass)
              if issubclass(m, types.BaseModel) and m.__module__ == types.__name__]
    versioned = [(m.__name__, n) for m in models for n, f in m.model_fields.items()
                 if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("since_format", 1) > 1]
    assert ("DeploymentSpec", "parallelism") in versioned
    for model_name, field_name in versioned:
        f = getattr(types, model_name).model_fields[field_name]
        assert f.exclude_if is not None and f.exclude_if(f.get_default(call_default_factory=True)), \
            f"{model_name}.{field_name} is since_format > 1 but is written at its default"


def test_an_inventory_from_a_newer_agent_loses_only_the_fields_this_one_does_not_know():
    inv = {"name": "a", "gpus": [{"index": 0, "uuid": "GPU-0", "memory_total": 10, "memory_used": 1,
                                  "from_the_future": {"x": 1}}], "also_new": [1, 2]}
    parsed = formats.validate_lenient(HostInventory, json.dumps(inv))
    assert parsed.gpus[0].memory_total == 10
    with pytest.raises(ValidationError):  # a wrong type is still wrong
        formats.validate_lenient(HostInventory, json.dumps({**inv, "cpu_count": "many"}))
    with pytest.raises(ValidationError):
        formats.validate_lenient(HostInventory, "{not json")


# ---------------------------------------------------------------- the replicated state


def test_every_command_says_which_format_it_needs():
    assert json.loads(delete_command("m"))["v"] == 1
    assert json.loads(deploy_command(spec(), []))["v"] == 1
    assert json.loads(deploy_command(spec(parallelism="gpus"), []))["v"] == 2
    assert json.loads(cluster_format_command(2))["v"] == 2


def test_entries_written_by_0_1_0_apply_as_format_1():
    st = ClusterState()
    legacy = json.dumps({"op": "deploy", "spec": spec().model_dump(mode="json"), "assignments": []}).encode()
    assert st.apply(1, 1, legacy).ok
    assert "m" in st.deployments


def test_an_entry_from_the_future_stops_apply_before_anything_changes():
    st = ClusterState()
    assert st.apply(1, 1, deploy_command(spec(), [])).ok
    before = st.snapshot()
    with pytest.raises(UpgradeRequired, match=rf"log entry 2 .*needs state format {STATE_FORMAT + 1}"):
        st.apply(2, 1, future_command(name="m"))
    assert st.snapshot() == before and st.last_index == 1  # not skipped: applied later by a newer agent
    with pytest.raises(UpgradeRequired):
        st.apply(2, 1, future_command(v=True))  # not a format number: refused the same way, never guessed


def test_the_leader_admits_nothing_newer_than_the_cluster_format():
    st = ClusterState()
    assert st.cluster_format == 1  # a log replayed from agentd 0.1.0's first entry
    newer = deploy_command(spec(parallelism="latency"), [])
    assert "needs state format 2, but the cluster still runs format 1" in st.admit(newer)
    assert st.admit(deploy_command(spec(), [])) == ""
    assert st.admit(cluster_format_command(2)) == ""  # judged by the coordinator, from reports
    assert st.apply(1, 1, cluster_format_command(2)).ok
    assert st.admit(newer) == ""
    assert not st.apply(2, 1, cluster_format_command(1)).ok  # never lowered
    assert st.cluster_format == 2


def test_snapshots_carry_their_format_and_a_newer_one_is_refused_whole():
    st = ClusterState()
    st.apply(1, 1, secret_init_command(SECRET))
    st.apply(2, 1, cluster_format_command(2))
    st.apply(3, 1, deploy_command(spec(), []))
    snap = json.loads(st.snapshot())
    assert snap["format"] == 2 and snap["cluster_format"] == 2
    copy = ClusterState()
    copy.restore(st.snapshot())
    assert copy.cluster_format == 2 and "m" in copy.deployments
    keep = copy.snapshot()
    with pytest.raises(UpgradeRequired, match="snapshot at index 3 needs state format 9"):
        copy.restore(json.dumps({**snap, "format": 9}).encode())
    assert copy.snapshot() == keep
    legacy = {k: v for k, v in snap.items() if k not in ("format", "cluster_format")}  # as 0.1.0 wrote it
    old = ClusterState()
    old.restore(json.dumps(legacy).encode())
    assert old.cluster_format == 1 and "m" in old.deployments


def test_a_node_that_meets_a_newer_entry_stops_applying_and_says_why(tmp_path):
    async def main():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        st = ClusterState()
        node = RaftNode("n1", f"127.0.0.1:{port}", tmp_path, st,
                        options=RaftOptions(heartbeat_interval=0.05, election_timeout_min=0.4,
                                            election_timeout_max=0.8, propose_timeout=2.0))
        await node.start()
        try:
            await node.wait_for_leader(10)
            await node.propose(deploy_command(spec("a"), []))
            with pytest.raises(UpgradeRequired):
                await node.propose(future_command(name="a"))  # bypasses the coordinator's admit
            assert "needs state format" in node.upgrade_required
            with pytest.raises(Exception):  # noqa: B017 - applied nowhere: refused or timed out
                await node.propose(delete_command("a"), timeout=0.5)
            assert "a" in st.deployments  # the later delete was not applied either
        finally:
            await node.stop(graceful=False)
        # Restarted on the same (old) release, it stops at the same entry again: nothing is skipped.
        st2 = ClusterState()
        again = RaftNode("n1", f"127.0.0.1:{port}", tmp_path, st2, options=RaftOptions(
            heartbeat_interval=0.05, election_timeout_min=0.4, election_timeout_max=0.8))
        await again.start()
        try:
            for _ in range(100):
                if again.upgrade_required:
                    break
                await asyncio.sleep(0.05)
            assert again.upgrade_required and "a" in st2.deployments
        finally:
            await again.stop(graceful=False)

    asyncio.run(main())


class _Consensus:
    def __init__(self, state: ClusterState, members: dict):
        self.state, self.members, self.term, self.is_leader, self.index = state, members, 1, True, 0

    async def propose(self, command: bytes, timeout: float | None = None):
        self.index += 1
        return self.state.apply(self.index, self.term, command)


class _Member:
    def __init__(self, voter: bool = True):
        self.voter = voter


def test_the_coordinator_raises_the_format_once_every_member_reports_it_and_names_who_holds_it_back():
    async def main():
        st = ClusterState()
        consensus = _Consensus(st, {"a": _Member(), "b": _Member(), "c": _Member(voter=False)})
        coord = Coordinator(state=st, consensus=consensus, place=None, inspect=None,
                            validate_runtime=lambda runtime: None, port_range=(40000, 40010),
                            node_down_grace=30.0)
        coord.became_leader()
        inv = {n: HostInventory(name=n) for n in "abc"}
        coord.on_report(inv["a"], [], PeerVersion("0.2.0", 2, 2))
        coord.on_report(inv["b"], [], PeerVersion())  # agentd 0.1.0: says nothing of itself
        assert await coord.raise_cluster_format() == ""
        why = coord.admit(deploy_command(spec(parallelism="latency"), []))
        assert "b (agentd 0.1.0, state format 1)" in why and "c (agentd 0.1.0" in why  # c never reported
        coord.on_report(inv["b"], [], PeerVersion("0.2.0", 2, 2))
        assert await coord.raise_cluster_format() == ""  # the learner c applies the log too
        coord.on_report(inv["c"], [], PeerVersion("0.2.0", 2, 2))
        assert "raised from 1" in await coord.raise_cluster_format()
        assert st.cluster_format == 2 and coord.admit(deploy_command(spec(parallelism="latency"), [])) == ""

    asyncio.run(main())


# ---------------------------------------------------------------- the data directory


def _v010_dir(root: Path) -> Path:
    (root / "raft").mkdir(parents=True)
    (root / "raft" / "raft.wal").write_bytes(b"AGDRAFT1" + b"\0" * 16)
    (root / "runtime" / "records").mkdir(parents=True)
    return root


def test_a_new_data_directory_is_stamped_with_the_current_format(tmp_path):
    assert datadir.prepare(tmp_path) == []
    raw = json.loads((tmp_path / datadir.FORMAT_FILE).read_text())
    assert raw == {"data_format": DATA_FORMAT, "agent_version": AGENT_VERSION}
    assert (tmp_path / datadir.FORMAT_FILE).stat().st_mode & 0o777 == 0o600


def test_a_0_1_0_data_directory_is_upgraded_in_place(tmp_path):
    d = _v010_dir(tmp_path)
    assert datadir.read_format(d) == (1, "0.1.0")
    steps = datadir.prepare(d)
    assert len(steps) == 1 and "format 1 -> 2" in steps[0]
    assert datadir.read_format(d) == (DATA_FORMAT, AGENT_VERSION)
    assert datadir.prepare(d) == []  # once is enough


def test_a_data_directory_of_a_newer_release_is_refused_with_both_versions(tmp_path):
    (tmp_path / datadir.FORMAT_FILE).write_text(json.dumps({"data_format": DATA_FORMAT + 1,
                                                            "agent_version": "0.3.0"}))
    with pytest.raises(UpgradeRequired) as err:
        datadir.prepare(tmp_path)
    msg = str(err.value)
    assert "agentd 0.3.0" in msg and f"this agentd {AGENT_VERSION}" in msg and "backup" in msg


@pytest.mark.parametrize("content", ["{", '{"data_format": "two"}', "[]", '{"data_format": 0}'])
def test_a_damaged_format_file_is_a_clear_error(tmp_path, content):
    (tmp_path / datadir.FORMAT_FILE).write_text(content)
    with pytest.raises(ConfigError, match=r"agentd-data\.json is unreadable"):
        datadir.prepare(tmp_path)


def test_a_foreign_raft_file_is_not_upgraded(tmp_path):
    d = _v010_dir(tmp_path)
    (d / "raft" / "raft.wal").write_bytes(b"SOMETHING ELSE")
    with pytest.raises(ConfigError, match="not a data directory agentd wrote"):
        datadir.prepare(d)
    assert not (d / datadir.FORMAT_FILE).exists()


def test_a_joiner_the_cluster_cannot_trust_with_its_format_is_refused_at_once(tmp_path):
    async def main():
        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        opts = RaftOptions(heartbeat_interval=0.05, election_timeout_min=0.4, election_timeout_max=0.8,
                           join_timeout=30.0)
        first = RaftNode("n1", f"127.0.0.1:{ports[0]}", tmp_path / "n1", ClusterState(), options=opts)
        seen: list[int] = []
        first.admit_joiner = lambda node_id, fmt: seen.append(fmt) or "the cluster writes state format 9"
        await first.start()
        joiner = RaftNode("n2", f"127.0.0.1:{ports[1]}", tmp_path / "n2", ClusterState(), options=opts,
                          join=[f"127.0.0.1:{ports[0]}"])
        try:
            await first.wait_for_leader(10)
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(UpgradeRequired, match="n2 cannot join: the cluster writes state format 9"):
                await joiner.start()
            assert asyncio.get_running_loop().time() - t0 < 10  # not retried until the 30 s join timeout
            assert seen == [STATE_FORMAT] and "n2" not in first.members
        finally:
            await first.stop(graceful=False)

    asyncio.run(main())
