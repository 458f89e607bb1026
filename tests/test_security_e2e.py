"""Security of a real cluster: two `agentd serve` processes with mutual TLS (LocalCluster(secure=True)).

The first agent holds the CA (as after `agentd init-ca`), the second joined
with a one-time token. Every check goes through real sockets: a peer without
a certificate from the cluster CA, joins with bad tokens, control calls
without admin credentials, API keys on /v1/ (tenants, revocation on every
agent at once), model servers reachable only with their own key, and launch
arguments full of shell metacharacters that must reach the process verbatim.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http import client as http_client
from pathlib import Path

import grpc
import pytest

from agentd.api.join_client import join_cluster
from agentd.cluster.raft.codec import encode
from agentd.cluster.raft.types import VoteRequest
from agentd.errors import InvalidInput, PeerError
from agentd.security import ca as C
from agentd.security.channel import channel_options
from agentd.security.tls import channel_credentials, load_identity
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port, simulated_host
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc
from agentd.v1 import raft_pb2 as rpb
from agentd.v1 import security_pb2 as spb
from agentd.v1 import security_pb2_grpc as spb_grpc
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

OK = grpc.StatusCode.OK


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    c = LocalCluster(root, hosts=[simulated_host("a", gpus=1, gpu_gib=0.272),
                                  simulated_host("b", gpus=1, gpu_gib=0.272)], secure=True)
    # a serves its HTTP side over HTTPS, with its node certificate (issued for 127.0.0.1 by the cluster CA).
    tls = c.agents["a"].tls_dir
    c.agent_env["a"] = {"AGENTD_HTTP_TLS_CERT": str(tls / "node.crt"), "AGENTD_HTTP_TLS_KEY": str(tls / "node.key")}
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


def members(c: LocalCluster) -> dict[str, str]:
    with c.any_client() as cl:
        return {m.id: m.address for m in cl.status().members}


def vote_request(sender: str, to: str, term: int) -> bytes:
    (msg,) = encode(VoteRequest(term=term, sender=sender, to=to, last_index=10**6, last_term=term - 1), "")
    return msg.SerializeToString()


def test_a_peer_without_a_cluster_certificate_cannot_join_or_vote(cluster, tmp_path):
    a, b = cluster.agents["a"], cluster.agents["b"]
    before = members(cluster)
    with cluster.any_client() as cl:
        term = cl.status().term
    # An impostor who has the public ca.crt and a node certificate from another CA, naming itself "b".
    rogue_ca = C.create_ca()
    rogue = C.issue_identity(rogue_ca, "b", role="node", addresses=["127.0.0.1"])
    rogue_creds = grpc.ssl_channel_credentials(ca_pem(cluster), rogue.key_pem, rogue.cert_pem)
    join = rpb.RaftJoinRequest(node_id="evil", address="127.0.0.1:1").SerializeToString()
    with channel(a.listen, rogue_creds) as ch:
        code, details = status(lambda: ch.unary_unary("/agentd.v1.Raft/Join")(join, timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE, details  # refused in the TLS handshake
        vote = vote_request("b", "a", term + 5)
        code, _ = status(lambda: ch.stream_unary("/agentd.v1.Raft/Send")(iter([vote]), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE
    # Without any certificate, on the token port (which asks for none): no role, no Raft.
    with channel(a.token_listen, grpc.ssl_channel_credentials(ca_pem(cluster))) as ch:
        code, details = status(lambda: ch.unary_unary("/agentd.v1.Raft/Join")(join, timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "client certificate" in details
        code, _ = status(lambda: ch.stream_unary("/agentd.v1.Raft/Send")(iter([vote]), timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    # A real admin certificate is not a node: it may not vote either.
    admin = load_identity(cluster.admin_dir, "admin")
    with channel(a.listen, channel_credentials(admin)) as ch:
        code, details = status(lambda: ch.stream_unary("/agentd.v1.Raft/Send")(iter([vote]), timeout=5))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "role node" in details

    # A genuine member may speak only for itself: b's certificate cannot vote, or report, as a.
    with channel(a.listen, channel_credentials(load_identity(b.tls_dir, "node"))) as ch:
        forged = vote_request("a", "a", term + 5)
        code, details = status(lambda: ch.stream_unary("/agentd.v1.Raft/Send")(iter([forged]), timeout=5))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "of 'b' may not speak for 'a'" in details
        code, details = status(lambda: pb_grpc.AgentStub(ch).Report(pb.ReportRequest(node="a"), timeout=5))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "may not speak for 'a'" in details

    # A whole agent process with a foreign CA tries to join: it never gets in.
    rogue_dir = tmp_path / "evil" / "tls"
    C.save_identity(rogue_dir, "node", C.issue_identity(rogue_ca, "evil", role="node", addresses=["127.0.0.1"]))
    inventory = tmp_path / "evil.json"
    inventory.write_text(json.dumps(simulated_host("evil", gpus=1)))
    log = tmp_path / "evil.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    env.update(AGENTD_CONFIG=str(tmp_path / "none.toml"), AGENTD_TOKEN_LISTEN=f"127.0.0.1:{free_port()}")
    (tmp_path / "none.toml").touch()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agentd", "serve", "--node-name", "evil", "--listen", f"127.0.0.1:{free_port()}",
             "--http-listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "evil"),
             "--simulate", str(inventory), "--log-format", "json", "--join", a.listen],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while "join attempt failed" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.1)
        assert "join attempt failed" in log.read_text(), log.read_text()[-2000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert members(cluster) == before, "nobody was added, nobody re-addressed"
    with cluster.any_client() as cl:
        st = cl.status()
    assert st.term == term and st.leader_id == "a", "no forged vote disturbed the cluster"
    assert b.alive


def test_join_tokens_are_one_time_expiring_and_pinned(cluster, tmp_path):
    a, b = cluster.agents["a"], cluster.agents["b"]
    token = cluster.create_token(ttl=600)
    tid, secret, pin = token.split(".")

    def attempt(tok: str, name: str, via: str = b.token_listen) -> None:
        join_cluster(tok, [via], tls_dir=tmp_path / name, node_name=name, addresses=["127.0.0.1"])

    wrong = secret[:-4] + ("aaaa" if not secret.endswith("aaaa") else "bbbb")
    with pytest.raises(InvalidInput, match="wrong secret"):
        attempt(f"{tid}.{wrong}.{pin}", "w1")
    with pytest.raises(PeerError, match="pin"):  # another cluster's token: the CA does not match, nothing is sent
        attempt(f"{tid}.{secret}.{'0' * 64}", "w2")
    with pytest.raises(InvalidInput, match="'a' is already a member"):  # nobody gets a certificate to pose as a
        attempt(token, "a")
    # The real thing, through b (which does not hold the CA key: it forwards to a), with the CLI.
    r = run_cli("join", "--token", token, "--server", b.token_listen, "--node-name", "d", "--dir",
                str(tmp_path / "d"), "--address", "127.0.0.1", "--json", env={"HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["signer"] == "a" and sorted(out["peers"]) == sorted([a.listen, b.listen])
    identity = load_identity(tmp_path / "d", "node")
    assert (identity.name, identity.role) == ("d", "node")
    assert identity.ca_pem == ca_pem(cluster) and (tmp_path / "d" / "node.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(InvalidInput, match="already used by d"):
        attempt(token, "e", via=a.token_listen)
    short = cluster.create_token(ttl=1)
    time.sleep(1.2)
    with pytest.raises(InvalidInput, match="expired"):
        attempt(short, "f")
    bound = cluster.create_token(node_name="g")
    with pytest.raises(InvalidInput, match="is for host 'g'"):
        attempt(bound, "h")
    for name in ("w1", "w2", "a", "e", "f", "h"):
        assert not (tmp_path / name / "node.crt").exists(), f"a refused join ({name}) left a certificate"
    with cluster.any_client() as cl:
        states = {t.id: (t.state, t.used_by) for t in cl.call("ListJoinTokens", spb.ListJoinTokensRequest()).tokens}
    assert states[tid] == ("used", "d") and states[bound.split(".")[0]] == ("active", "")


def test_control_calls_need_admin_credentials(cluster, tmp_path):
    a = cluster.agents["a"]
    with cluster.any_client() as cl:
        admin_key = cl.call("CreateApiKey", spb.CreateApiKeyRequest(tenant="ops", admin=True)).key
        user_key = cl.call("CreateApiKey", spb.CreateApiKeyRequest(tenant="acme")).key
        doomed = cl.call("CreateApiKey", spb.CreateApiKeyRequest(tenant="ops", admin=True))
        cl.call("RevokeApiKey", spb.RevokeApiKeyRequest(id=doomed.info.id))

    def calls(bearer: str | None) -> tuple[tuple, tuple]:
        creds = grpc.ssl_channel_credentials(ca_pem(cluster))
        if bearer:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(bearer))
        with channel(a.token_listen, creds) as ch:
            listed = status(lambda: pb_grpc.ControlStub(ch).List(pb.ListRequest(), timeout=5))
            keyed = status(lambda: spb_grpc.SecurityStub(ch).CreateApiKey(
                spb.CreateApiKeyRequest(tenant="x", admin=True), timeout=5))
        return listed, keyed

    (code, details), (code2, _) = calls(None)
    assert code == code2 == grpc.StatusCode.UNAUTHENTICATED and "admin bearer token" in details
    (code, details), (code2, _) = calls(user_key)
    assert code == code2 == grpc.StatusCode.PERMISSION_DENIED and "role user" in details
    (code, _), _ = calls(doomed.key)
    assert code == grpc.StatusCode.UNAUTHENTICATED, "a revoked admin key is no credential"
    (code, _), (code2, _) = calls(admin_key)
    assert code == code2 == OK

    # The CLI: an admin key in AGENTD_TOKEN against the token port; nothing at all gets a hint, not a traceback.
    home = tmp_path / "home"
    (home / ".config" / "agentd" / "tls").mkdir(parents=True)
    (home / ".config" / "agentd" / "tls" / "ca.crt").write_bytes(ca_pem(cluster))
    r = run_cli("keys", "ls", "--server", a.token_listen, "--json", env={"HOME": str(home), "AGENTD_TOKEN": admin_key})
    assert r.returncode == 0, r.stderr
    assert {k["tenant"] for k in json.loads(r.stdout)["keys"]} >= {"ops", "acme"}
    assert admin_key.split("_")[2] not in r.stdout, "secrets are never listed"
    r = run_cli("ls", "--server", a.listen, env={"HOME": str(tmp_path / "nobody")})
    assert r.returncode == 3 and "AGENTD_TOKEN" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("ls", "--server", a.token_listen, env={"HOME": str(home), "AGENTD_TOKEN": user_key})
    assert r.returncode == 2 and "PERMISSION" not in r.stderr and "needs role" in r.stderr, r.stderr


def test_the_cli_manages_keys_and_tokens_with_an_admin_certificate(cluster, tmp_path):
    a, b = cluster.agents["a"], cluster.agents["b"]
    env = {"AGENTD_TLS_DIR": str(cluster.admin_dir), "HOME": str(tmp_path)}
    r = run_cli("keys", "create", "--tenant", "acme", "--model", "tiny", "--name", "ci", "--expires", "90d",
                "--server", b.listen, "--json", env=env)
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    assert created["key"].startswith("agd_") and created["models"] == ["tiny"] and created["state"] == "active"
    r = run_cli("keys", "revoke", created["id"], "--server", a.listen, env=env)
    assert r.returncode == 0 and "every agent refuses it now" in r.stdout, r.stdout + r.stderr
    r = run_cli("keys", "revoke", "nosuchkey0", "--server", a.listen, env=env)
    assert r.returncode == 2 and "agentd keys ls" in r.stderr
    r = run_cli("token", "create", "--ttl", "5m", "--node-name", "z", "--server", b.listen, env=env)
    assert r.returncode == 0 and "only for host z" in r.stderr, r.stderr
    assert r.stdout.count("\n") == 1, "only the token on stdout: T=$(agentd token create) must capture it alone"
    with cluster.any_client() as cl:
        keys = {k.id: k for k in cl.call("ListApiKeys", spb.ListApiKeysRequest()).keys}
        tokens = [t for t in cl.call("ListJoinTokens", spb.ListJoinTokensRequest()).tokens if t.node_name == "z"]
    assert keys[created["id"]].state == "revoked" and keys[created["id"]].name == "ci"
    assert len(tokens) == 1 and tokens[0].id == r.stdout.split(".")[0]


def http(method: str, url: str, key: str | None = None, body: dict | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, method=method, headers=headers,
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=60, context=context) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"{}")
        except ValueError:
            return exc.code, {"raw": raw.decode(errors="replace")}


def api(cluster: LocalCluster, name: str, method: str, path: str, **kw) -> tuple[int, dict]:
    """A call to agent `name`'s HTTP side: a serves HTTPS (verified against the cluster CA), b plain HTTP."""
    agent = cluster.agents[name]
    if name == "a":
        return http(method, f"https://{agent.http_listen}{path}",
                    context=ssl.create_default_context(cadata=ca_pem(cluster).decode()), **kw)
    return http(method, f"http://{agent.http_listen}{path}", **kw)


def test_the_http_side_serves_https_with_the_configured_certificate(cluster):
    a = cluster.agents["a"]
    assert api(cluster, "a", "GET", "/healthz")[0] == 200
    assert api(cluster, "a", "GET", "/v1/models")[0] == 401  # HTTPS does not replace the API key
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        http("GET", f"https://{a.http_listen}/healthz", context=ssl.create_default_context())  # system CAs only
    with pytest.raises((urllib.error.URLError, ConnectionError, http_client.HTTPException)):
        http("GET", f"http://{a.http_listen}/healthz")  # no plain HTTP beside it


@pytest.mark.llamacpp
def test_model_servers_keys_tenants_revocation_and_verbatim_argv(cluster, tmp_path):
    a, b = cluster.agents["a"], cluster.agents["b"]
    marker = tmp_path / "PWNED"
    evil = f"$(touch {marker}); rm -rf {tmp_path}/gone `touch {marker}` && echo ${{IFS}}x | sh"
    model_dir = tmp_path / "models $(touch x)"
    model_dir.mkdir()
    model = model_dir / "tiny;`touch m`.gguf"
    write_tiny_llama_gguf(model, n_layers=8, hidden=256, ffn=512)
    (tmp_path / "gone").mkdir()
    spec = pb.DeploymentSpec(name="tiny", model=str(model), runtime="llamabox", replicas=1, tenant="acme",
                             options=pb.RuntimeOptions(ctx_size=256, extra_args=["--tags", evil],
                                                       env={"AGENTD_TEST_EVIL": evil}))
    with cluster.any_client() as cl:
        cl.deploy(spec)
        acme = cl.call("CreateApiKey", spb.CreateApiKeyRequest(tenant="acme", name="app")).key
        globex = cl.call("CreateApiKey", spb.CreateApiKeyRequest(tenant="globex")).key
        deadline = time.monotonic() + 60
        while True:
            parts = cl.call("ListInstances", pb.ListInstancesRequest(deployment="tiny")).instances
            if len(parts) == 2 and all(p.state == "RUNNING" for p in parts):
                break
            assert time.monotonic() < deadline and not any(p.state == "FATAL" for p in parts), parts
            time.sleep(0.1)
    main = next(p for p in parts if p.role == "main")

    # The launch arguments reached the process exactly as given: no shell ever saw them.
    argv = Path(f"/proc/{main.pid}/cmdline").read_bytes().split(b"\0")[:-1]
    assert str(model).encode() in argv and evil.encode() in argv
    assert argv[argv.index(b"--tags") + 1] == evil.encode()
    assert f"AGENTD_TEST_EVIL={evil}".encode() in Path(f"/proc/{main.pid}/environ").read_bytes().split(b"\0")
    assert not marker.exists() and (tmp_path / "gone").is_dir() and not (model_dir / "m").exists()
    key_arg = argv[argv.index(b"--api-key-file") + 1].decode()
    assert Path(key_arg).stat().st_mode & 0o777 == 0o600 and b"agdsrv_" not in b" ".join(argv)

    # The model server listens on the internal address and wants its own key; its health stays open.
    server = f"http://{main.endpoint}"
    assert main.endpoint.startswith("127.0.0.1:")
    completion = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    assert http("GET", f"{server}/health")[0] == 200
    assert http("POST", f"{server}/v1/completions", body=completion)[0] == 401
    assert http("POST", f"{server}/v1/completions", key=acme, body=completion)[0] == 401, "user keys do not work there"

    # Through agentd on either agent: the tenant's key works, another tenant's key is refused.
    for agent in (a, b):
        code, body = api(cluster, agent.name, "POST", "/v1/completions", key=acme, body=completion)
        assert code == 200 and body["choices"], body
    code, body = api(cluster, "b", "POST", "/v1/completions", key=globex, body=completion)
    assert code == 404 and body["error"]["code"] == "model_not_found", "another tenant's model does not exist for it"
    assert api(cluster, "a", "GET", "/v1/models", key=globex)[1]["data"] == []
    assert api(cluster, "a", "POST", "/v1/completions", body=completion)[0] == 401

    # Revocation: once the call returns, every agent refuses the key (no waiting).
    with cluster.any_client() as cl:
        acme_id = acme.split("_")[1]
        reply = cl.call("RevokeApiKey", spb.RevokeApiKeyRequest(id=acme_id))
    assert list(reply.lagging) == [] and reply.info.state == "revoked"
    for agent in (a, b):
        code, body = api(cluster, agent.name, "POST", "/v1/completions", key=acme, body=completion)
        assert code == 401 and body["error"]["code"] == "invalid_api_key", (agent.name, body)
    with cluster.any_client() as cl:
        cl.call("Delete", pb.DeleteRequest(name="tiny"))
