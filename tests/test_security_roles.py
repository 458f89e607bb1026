"""Who may do what, against real agents over real TLS (issue 13): three `agentd serve` processes with mutual TLS.

Each test is an attack from docs/security.md's threat model, tried the way an
attacker would: with a join token, a member's own certificate, a certificate
that was revoked, or through a follower. Each failed on the code before the
leader judged the original caller and the node role shrank to what a host needs.
"""

from __future__ import annotations

import datetime
import json
import signal
import socket
import ssl
import threading
import time

import grpc
import pytest
from cryptography import x509

from agentd.api.client import ControlClient
from agentd.api.join_client import join_cluster
from agentd.cluster.raft.codec import encode
from agentd.cluster.raft.types import VoteRequest
from agentd.security import ca as C
from agentd.security.channel import channel_options
from agentd.security.tls import channel_credentials, load_identity
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, simulated_host
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc
from agentd.v1 import raft_pb2 as rpb
from agentd.v1 import security_pb2 as spb
from agentd.v1 import security_pb2_grpc as spb_grpc
from agentd.version import AGENT_VERSION
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("roles")
    # b claims, in its own report, to be dedicated to tenant acme: only the operator's approval may say so.
    hosts = [simulated_host("a", gpus=1), simulated_host("b", gpus=1, labels={"tenant.agentd.io/acme": "true"}),
             simulated_host("c", gpus=1)]
    c = LocalCluster(root, hosts=hosts, secure=True)
    try:
        c.start()
        c.wait_for_inventories()
        yield c
    finally:
        c.stop()


def ca_pem(c: LocalCluster) -> bytes:
    return (c.admin_dir / "ca.crt").read_bytes()


def status(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, ""


def channel(address: str, creds: grpc.ChannelCredentials) -> grpc.Channel:
    return grpc.secure_channel(address, creds, options=channel_options())


def as_node(c: LocalCluster, name: str, directory=None) -> grpc.ChannelCredentials:
    return channel_credentials(load_identity(directory or c.agents[name].tls_dir, "node"))


def leader_and_follower(c: LocalCluster) -> tuple[str, str]:
    lead = c.wait_for_leader()[0]
    return lead, next(n for n in c.agents if n != lead and c.agents[n].alive)


def members(c: LocalCluster) -> dict[str, str]:
    with c.agents[c.wait_for_leader()[0]].client() as cl:
        return {m.id: m.address for m in cl.status().members}


def vote(sender: str, to: str, term: int) -> bytes:
    (msg,) = encode(VoteRequest(term=term, sender=sender, to=to, last_index=10**6, last_term=term - 1), "")
    return msg.SerializeToString()


def admin_calls(ch: grpc.Channel) -> dict[str, tuple[grpc.StatusCode, str]]:
    """The admin actions the hostile test of the old code succeeded with, holding only a host certificate."""
    sec, ctl = spb_grpc.SecurityStub(ch), pb_grpc.ControlStub(ch)
    spec = pb.DeploymentSpec(name="stolen", model="/nonexistent.gguf", runtime="llamabox", replicas=1)
    return {
        "CreateApiKey": status(lambda: sec.CreateApiKey(spb.CreateApiKeyRequest(tenant="x", admin=True), timeout=10)),
        "CreateJoinToken": status(lambda: sec.CreateJoinToken(spb.CreateJoinTokenRequest(node_name="y"), timeout=10)),
        "Deploy": status(lambda: ctl.Deploy(pb.DeployRequest(spec=spec), timeout=10)),
        "List": status(lambda: ctl.List(pb.ListRequest(), timeout=10)),
    }


@pytest.fixture(scope="module")
def rogue(cluster, tmp_path_factory):
    """What a join token yields: a node certificate for a name that never runs an agent."""
    directory = tmp_path_factory.mktemp("rogue") / "tls"
    token = cluster.create_token("rogue")
    lead = cluster.wait_for_leader()[0]
    join_cluster(token, [cluster.agents[lead].token_listen], tls_dir=directory, node_name="rogue",
                 addresses=["127.0.0.1"])
    return directory


def test_a_join_token_grants_no_admin_rights(cluster, rogue):
    lead, follower = leader_and_follower(cluster)
    for name in (lead, follower):
        with channel(cluster.agents[name].listen, as_node(cluster, "rogue", rogue)) as ch:
            for method, (code, details) in admin_calls(ch).items():
                assert code == DENIED and "not a member" in details, (name, method, code, details)
    # Nor does a genuine member's certificate, at the leader or through a follower.
    for name in (lead, follower):
        with channel(cluster.agents[name].listen, as_node(cluster, follower)) as ch:
            for method, (code, details) in admin_calls(ch).items():
                assert code == DENIED and "needs role admin" in details, (name, method, code, details)
    with cluster.any_client() as cl:
        assert "stolen" not in {d.spec.name for d in cl.call("List", pb.ListRequest()).deployments}


def test_a_host_that_is_not_a_member_is_refused_everywhere(cluster, rogue):
    with cluster.any_client() as cl:
        term = cl.status().term
    for agent in cluster.agents.values():
        with channel(agent.listen, as_node(cluster, "rogue", rogue)) as ch:
            calls = {
                "Status": lambda: pb_grpc.ControlStub(ch).Status(pb.StatusRequest(), timeout=5),
                "Report": lambda: pb_grpc.AgentStub(ch).Report(pb.ReportRequest(node="rogue"), timeout=5),
                "Send": lambda to=agent.name: ch.stream_unary("/agentd.v1.Raft/Send")(
                    iter([vote("rogue", to, term + 3)]), timeout=5),
            }
            for method, call in calls.items():
                code, details = status(call)
                assert code == DENIED and "'rogue' is not a member" in details, (agent.name, method, details)
    with cluster.any_client() as cl:
        assert cl.status().term == term, "no vote of a stranger disturbed the cluster"


def test_a_host_cannot_remove_another_member(cluster):
    lead, follower = leader_and_follower(cluster)
    victim = next(n for n in cluster.agents if n not in (lead, follower))
    before = members(cluster)
    with channel(cluster.agents[lead].listen, as_node(cluster, follower)) as ch:
        leave = rpb.RaftLeaveRequest(node_id=victim).SerializeToString()
        code, details = status(lambda: ch.unary_unary("/agentd.v1.Raft/Leave")(leave, timeout=10))
    assert code == DENIED and f"of {follower!r} may not speak for {victim!r}" in details, details
    time.sleep(0.5)
    assert members(cluster) == before


def test_a_host_cannot_readdress_another_member(cluster):
    lead, follower = leader_and_follower(cluster)
    victim = next(n for n in cluster.agents if n not in (lead, follower))
    before = members(cluster)
    join = rpb.RaftJoinRequest(node_id=victim, address="127.0.0.1:1", has_log=True).SerializeToString()
    for name in (lead, follower):
        with channel(cluster.agents[name].listen, as_node(cluster, follower)) as ch:
            code, details = status(lambda: ch.unary_unary("/agentd.v1.Raft/Join")(join, timeout=10))
        assert code == DENIED and f"may not speak for {victim!r}" in details, (name, details)
    time.sleep(0.5)
    assert members(cluster) == before, "nobody was re-addressed to a dead port"
    with cluster.any_client() as cl:
        nodes = {n.name: n.state for n in cl.call("ListNodes", pb.ListNodesRequest()).nodes}
    assert nodes[victim] == "up"


def test_a_host_reports_on_its_report_stream_for_itself_only(cluster):
    lead, follower = leader_and_follower(cluster)
    victim = next(n for n in cluster.agents if n not in (lead, follower))
    inv = json.dumps(simulated_host(victim, gpus=1))
    claim = pb.ReportUpdate(node=victim, inventory_json=inv, agent_version=AGENT_VERSION, instances_changed=True)
    with channel(cluster.agents[lead].listen, as_node(cluster, follower)) as ch:
        stream = ch.stream_stream("/agentd.v1.Agent/ReportStream", request_serializer=pb.ReportUpdate.SerializeToString,
                                  response_deserializer=pb.ReportReply.FromString)
        code, details = status(lambda: list(stream(iter([claim]), timeout=10)))
        assert code == DENIED and f"of {follower!r} may not speak for {victim!r}" in details, details
        # Its own name first, then another host's: the stream speaks for one host.
        own = pb.ReportUpdate(node=follower, inventory_json=json.dumps(simulated_host(follower, gpus=1)),
                              agent_version=AGENT_VERSION, instances_changed=True)
        code, details = status(lambda: list(stream(iter([own, pb.ReportUpdate(node=victim)]), timeout=10)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"not {victim!r}" in details, details


def test_the_leader_judges_the_original_caller_of_a_forwarded_call(cluster):
    lead, follower = leader_and_follower(cluster)
    with cluster.agents[lead].client() as cl:
        admin_key = cl.call("CreateApiKey", spb.CreateApiKeyRequest(tenant="ops", admin=True)).key
        user_key = cl.call("CreateApiKey", spb.CreateApiKeyRequest(tenant="acme")).key

    def through_follower(key: str) -> dict[str, tuple[grpc.StatusCode, str]]:
        creds = channel_credentials(ca_pem=ca_pem(cluster), bearer_token=key)
        with channel(cluster.agents[follower].token_listen, creds) as ch:
            return {
                "CreateJoinToken": status(lambda: spb_grpc.SecurityStub(ch).CreateJoinToken(
                    spb.CreateJoinTokenRequest(node_name="later"), timeout=10)),
                "ListInstances": status(lambda: pb_grpc.ControlStub(ch).ListInstances(
                    pb.ListInstancesRequest(), timeout=10)),
            }

    assert {m: c for m, (c, _) in through_follower(admin_key).items()} == {"CreateJoinToken": OK, "ListInstances": OK}
    for method, (code, details) in through_follower(user_key).items():
        assert code == DENIED and "role user" in details, (method, details)

    # An admin certificate on a follower is told where the leader is (its key cannot travel with the call) ...
    admin = channel_credentials(load_identity(cluster.admin_dir, "admin"))
    with channel(cluster.agents[follower].listen, admin) as ch:
        call = spb_grpc.SecurityStub(ch).ListJoinTokens.with_call
        with pytest.raises(grpc.RpcError) as exc:
            call(spb.ListJoinTokensRequest(), timeout=10)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(exc.value.trailing_metadata())["x-agentd-redirect"] == cluster.agents[lead].listen
    # ... and the client follows it.
    with cluster.agents[follower].client() as cl:
        assert cl.call("ListJoinTokens", spb.ListJoinTokensRequest()).tokens
        assert cl.address == cluster.agents[lead].listen


def test_the_cli_never_uses_the_hosts_own_certificate(cluster, tmp_path):
    lead = cluster.wait_for_leader()[0]
    node_dir = cluster.agents[lead].tls_dir  # readable by the agent's user, as on a GPU host
    r = run_cli("ls", "--server", cluster.agents[lead].listen,
                env={"AGENTD_TLS_DIR": str(node_dir), "HOME": str(tmp_path)})
    assert r.returncode == 3 and "admin certificate" in r.stderr, (r.returncode, r.stdout, r.stderr)
    r = run_cli("ls", "--server", cluster.agents[lead].listen,
                env={"AGENTD_TLS_DIR": str(cluster.admin_dir), "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr


def test_join_tokens_are_bound_to_a_host_unless_asked_otherwise(cluster, tmp_path):
    with cluster.any_client() as cl:
        with pytest.raises(Exception, match="--any-node"):
            cl.call("CreateJoinToken", spb.CreateJoinTokenRequest(ttl_seconds=60))
        assert cl.call("CreateJoinToken", spb.CreateJoinTokenRequest(ttl_seconds=60, any_node=True)).token
    env = {"AGENTD_TLS_DIR": str(cluster.admin_dir), "HOME": str(tmp_path)}
    server = cluster.agents["a"].listen
    r = run_cli("token", "create", "--server", server, env=env)
    assert r.returncode == 2 and "--node NAME" in r.stderr and not r.stdout, r.stderr
    r = run_cli("token", "create", "--node", "gpu-9", "--server", server, env=env)
    assert r.returncode == 0 and "only for host gpu-9" in r.stderr, r.stderr
    r = run_cli("token", "create", "--any-node", "--server", server, "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["node_name"] == "", r.stderr


def test_a_revoked_certificate_is_refused_on_open_streams(cluster, tmp_path):
    lead, follower = leader_and_follower(cluster)
    ca = C.load_ca(cluster.agents["a"].tls_dir, need_key=True)  # a ran init-ca: it holds the CA key
    C.save_identity(tmp_path / "mallory", "admin", C.issue_identity(ca, "mallory", role="admin"))
    creds = channel_credentials(load_identity(tmp_path / "mallory", "admin"))
    ch = channel(cluster.agents[lead].listen, creds)
    assert status(lambda: pb_grpc.ControlStub(ch).List(pb.ListRequest(), timeout=5))[0] == OK  # and now cached
    ended: dict[str, object] = {}

    def watch() -> None:
        try:
            for _ in pb_grpc.ControlStub(ch).Watch(pb.WatchRequest(), timeout=60):
                pass
            ended["code"] = OK
        except grpc.RpcError as exc:
            ended["code"], ended["details"], ended["at"] = exc.code(), exc.details(), time.monotonic()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(0.5)
    assert watcher.is_alive(), ended
    env = {"AGENTD_TLS_DIR": str(cluster.admin_dir), "HOME": str(tmp_path)}
    r = run_cli("certs", "revoke", "mallory", "--server", cluster.agents[follower].listen, env=env)
    assert r.returncode == 0 and "every agent refuses them now" in r.stdout, r.stdout + r.stderr
    revoked_at = time.monotonic()
    watcher.join(10)
    assert not watcher.is_alive(), "the open stream of a revoked identity was closed"
    assert ended["code"] == grpc.StatusCode.UNAUTHENTICATED and "revoked" in ended["details"], ended
    assert ended["at"] - revoked_at < 5
    for agent in cluster.agents.values():  # the cached certificate does not hide it, on any agent
        with channel(agent.listen, creds) as other:
            code, details = status(lambda: pb_grpc.ControlStub(other).Status(pb.StatusRequest(), timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "'mallory' was revoked" in details, (agent.name, details)
    ch.close()
    # A certificate issued for the name afterwards is a new one, and works.
    time.sleep(1.1)
    C.save_identity(tmp_path / "mallory2", "admin", C.issue_identity(ca, "mallory", role="admin"))
    again = channel_credentials(load_identity(tmp_path / "mallory2", "admin"))
    with channel(cluster.agents[lead].listen, again) as ch2:
        assert status(lambda: pb_grpc.ControlStub(ch2).List(pb.ListRequest(), timeout=5))[0] == OK


def plan_hosts(c: LocalCluster, model, **fields) -> tuple[bool, set[str]]:
    spec = pb.DeploymentSpec(name="probe", model=str(model), runtime="llamabox",
                             options=pb.RuntimeOptions(ctx_size=256), **fields)
    with c.any_client() as cl:
        reply = cl.call("Plan", pb.PlanRequest(spec=spec))
    plan = json.loads(reply.plan_json)
    return reply.placed, {p["host"] for r in plan.get("replicas", []) for p in r["parts"]}


def test_hosts_the_operator_did_not_approve_get_no_tenants_work(cluster, tmp_path):
    model = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(model, n_layers=8, hidden=256, ffn=512)
    acme = {"tenant.agentd.io/acme": "true"}
    placed, hosts = plan_hosts(cluster, model, replicas=1, selector=acme)
    assert not placed and hosts == set(), "b's own claim to be acme's host counts for nothing"
    # A host whose join token needs approval gets no work until the operator approves it.
    with cluster.any_client() as cl:
        cl.call("CreateJoinToken", spb.CreateJoinTokenRequest(node_name="c", needs_approval=True, ttl_seconds=60))
    placed, hosts = plan_hosts(cluster, model, replicas=3, strategy="spread")
    assert "c" not in hosts, hosts
    env = {"AGENTD_TLS_DIR": str(cluster.admin_dir), "HOME": str(tmp_path)}
    r = run_cli("nodes", "approve", "c", "--tenant", "acme", "--server", cluster.agents["a"].listen, env=env)
    assert r.returncode == 0 and "host c approved for tenants acme" in r.stdout, r.stdout + r.stderr
    placed, hosts = plan_hosts(cluster, model, replicas=1, selector=acme)
    assert placed and hosts == {"c"}, hosts
    placed, hosts = plan_hosts(cluster, model, replicas=3, strategy="spread")
    assert placed and hosts == {"a", "b", "c"}, hosts


@pytest.mark.llamacpp
def test_logs_are_read_where_the_instance_runs_by_an_admin_or_its_own_host(cluster, tmp_path):
    lead, host = leader_and_follower(cluster)
    third = next(n for n in cluster.agents if n not in (lead, host))
    model = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(model, n_layers=8, hidden=256, ffn=512)
    spec = pb.DeploymentSpec(name="logme", model=str(model), runtime="llamabox", replicas=1,
                             options=pb.RuntimeOptions(ctx_size=256), pin=[pb.GpuPin(host=host)])
    with cluster.agents[lead].client() as cl:
        cl.deploy(spec)
        deadline = time.monotonic() + 60
        while True:
            parts = cl.call("ListInstances", pb.ListInstancesRequest(deployment="logme")).instances
            if parts and all(p.state == "RUNNING" for p in parts):
                break
            assert time.monotonic() < deadline and not any(p.state == "FATAL" for p in parts), parts
            time.sleep(0.2)
    try:
        # An admin certificate at the leader is sent to the host that runs it; the client follows.
        with cluster.agents[lead].client() as cl:
            chunks = list(cl.stream("Logs", pb.LogsRequest(instance_id="logme-r0", part=-1, tail_lines=5)))
            assert chunks and {c.host for c in chunks} == {host}
            assert cl.address == cluster.agents[host].listen
        # An admin key travels with the call to that host, which verifies it.
        with cluster.agents[lead].client() as cl:
            key = cl.call("CreateApiKey", spb.CreateApiKeyRequest(tenant="ops", admin=True)).key
        creds = channel_credentials(ca_pem=ca_pem(cluster), bearer_token=key)
        deadline = time.monotonic() + 10
        with channel(cluster.agents[third].token_listen, creds) as ch:
            while True:
                try:
                    got = list(pb_grpc.ControlStub(ch).Logs(pb.LogsRequest(instance_id="logme-r0", part=-1,
                                                                           tail_lines=5), timeout=10))
                    break
                except grpc.RpcError as exc:  # the key reaches every agent's copy of the state in a moment
                    assert time.monotonic() < deadline and exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
                    time.sleep(0.1)
        assert got and {c.host for c in got} == {host}
        # Another host may not read it: a host reads only the logs of instances it has a part of.
        with channel(cluster.agents[host].listen, as_node(cluster, third)) as ch:
            code, details = status(lambda: list(pb_grpc.AgentStub(ch).Logs(
                pb.LogsRequest(instance_id="logme-r0", part=-1), timeout=10)))
        assert code == DENIED and "only the logs of its own instances" in details, details
    finally:
        with cluster.agents[lead].client() as cl:
            cl.call("Delete", pb.DeleteRequest(name="logme"))


def served_certificate(c: LocalCluster, address: str):
    """The certificate an agent presents on its mutual-TLS port now (a fresh handshake, as an admin)."""
    from cryptography import x509

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=ca_pem(c).decode())
    ctx.load_cert_chain(c.admin_dir / "admin.crt", c.admin_dir / "admin.key")
    ctx.set_alpn_protocols(["h2"])
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def test_a_host_renews_its_certificate_through_the_cluster_before_it_expires(cluster):
    lead, follower = leader_and_follower(cluster)
    host = cluster.agents[follower]  # not a signer: it must ask one, with its current certificate
    cluster.kill(follower, signal.SIGTERM)
    ca = C.load_ca(cluster.agents["a"].tls_dir, need_key=True)
    old = C.issue_identity(ca, follower, role="node", addresses=["127.0.0.1"],
                           now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=300))
    C.save_identity(host.tls_dir, "node", old)  # 65 days left of 365: due
    old_key = (host.tls_dir / "node.key").read_bytes()
    cluster.start_agent(follower)
    deadline = time.monotonic() + 30
    while "renewed this host's certificate" not in host.log_file.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "renewed this host's certificate" in host.log_file.read_text(), host.log_file.read_text()[-3000:]
    renewed = load_identity(host.tls_dir, "node")
    assert renewed.name == follower and (host.tls_dir / "node.key").read_bytes() != old_key
    served = served_certificate(cluster, host.listen)
    assert served.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=360), \
        "the agent presents the renewed certificate without a restart"
    assert ("127.0.0.1" in [str(i) for i in served.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)])
    with channel(cluster.agents[lead].listen, channel_credentials(renewed)) as ch:
        assert status(lambda: pb_grpc.ControlStub(ch).Status(pb.StatusRequest(), timeout=5))[0] == OK
    # A host may renew only itself.
    from agentd.security.renewal import renewal_request
    other = renewal_request(cluster.agents[lead].tls_dir.joinpath("node.crt").read_bytes())
    with channel(cluster.agents["a"].listen, channel_credentials(renewed)) as ch:
        code, details = status(lambda: spb_grpc.SecurityStub(ch).RenewCertificate(
            spb.RenewCertificateRequest(csr_pem=other.csr_pem), timeout=5))
    assert code == DENIED and f"may renew only itself, not {lead!r}" in details, details
    cluster.wait_for_inventories()


def test_the_cluster_secret_rotates_without_stopping_anything(cluster, tmp_path):
    lead, follower = leader_and_follower(cluster)
    env = {"AGENTD_TLS_DIR": str(cluster.admin_dir), "HOME": str(tmp_path)}
    deadline = time.monotonic() + 20
    while True:  # the previous test restarted a follower: it may take a moment to follow the leader again
        r = run_cli("keys", "rotate-secret", "--server", cluster.agents[follower].listen, "--json", env=env)
        if r.returncode != 3 or "no leader" not in r.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "cluster secret rotated" in out["message"] and out["lagging"] == [], out
    with channel(cluster.agents[lead].listen, as_node(cluster, follower)) as ch:
        code, details = status(lambda: spb_grpc.SecurityStub(ch).RotateClusterSecret(
            spb.RotateClusterSecretRequest(), timeout=10))
    assert code == DENIED and "needs role admin" in details, "a host cannot rotate it"


def test_a_revoked_host_is_removed_and_refused(cluster):
    """Last in the module: it takes a host out of the cluster."""
    lead, _ = leader_and_follower(cluster)
    victim = next(n for n in cluster.agents if n != lead)
    # An open Raft stream in the victim's name (nothing sent on it yet) is closed by the revocation.
    stop, ended = threading.Event(), {}

    def quiet():
        stop.wait(60)
        yield from ()

    def raft_stream() -> None:
        with channel(cluster.agents[lead].listen, as_node(cluster, victim)) as ch:
            ended["code"], ended["details"] = status(lambda: ch.stream_unary("/agentd.v1.Raft/Send")(quiet(),
                                                                                                   timeout=60))

    streamer = threading.Thread(target=raft_stream, daemon=True)
    streamer.start()
    time.sleep(0.5)
    assert streamer.is_alive(), ended
    with ControlClient(cluster.agents[lead].listen, auth=cluster.agents[lead].auth) as cl:
        reply = cl.call("RevokeCertificate", spb.RevokeCertificateRequest(name=victim))
    assert reply.removed and list(reply.lagging) == [], reply
    streamer.join(10)
    stop.set()
    assert ended.get("code") == grpc.StatusCode.UNAUTHENTICATED and "revoked" in ended["details"], ended
    assert victim not in members(cluster)
    for agent in cluster.agents.values():
        if agent.name == victim:
            continue
        with channel(agent.listen, as_node(cluster, victim)) as ch:
            code, details = status(lambda: pb_grpc.ControlStub(ch).Status(pb.StatusRequest(), timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED and f"{victim!r} was revoked" in details, details
