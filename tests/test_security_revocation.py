"""Revocation, rotation and approval records in the replicated state (issue 13), and the interceptor's checks.

`cert.revoke` is a new state-machine op (state format 2): the leader writes it
only once every member runs a release that applies it, and an older snapshot
reader never sees an empty list it does not know.
"""

from __future__ import annotations

import json

from agentd.cluster.state import (
    OP_SINCE,
    ClusterState,
    assign_command,
    cert_revoke_command,
    cluster_format_command,
    deploy_command,
    node_approve_command,
    node_hold_command,
    secret_init_command,
    secret_rotate_command,
)
from agentd.security import auth
from agentd.security import ca as C
from agentd.security.apikeys import model_server_key
from agentd.testing.statefill import assignment, spec


def test_cert_revoke_is_a_format_2_op_the_leader_writes_only_once_every_member_runs_it():
    assert OP_SINCE["cert.revoke"] == 2
    command = cert_revoke_command("b", 1000.0)
    assert json.loads(command)["v"] == 2
    st = ClusterState()
    assert "needs state format 2" in st.admit(command)  # a cluster still at format 1 (an agentd 0.1.0 member)
    assert st.apply(1, 1, cluster_format_command(2)).ok
    assert st.admit(command) == ""
    assert st.apply(2, 1, command).ok


def test_a_revocation_covers_certificates_issued_up_to_it_and_not_later_ones():
    st = ClusterState()
    st.apply(1, 1, cluster_format_command(2))
    assert st.cert_revocation("b", 999.0) == ""
    st.apply(2, 1, cert_revoke_command("b", 1000.5))
    assert "'b' was revoked" in st.cert_revocation("b", 999.0)
    assert "'b' was revoked" in st.cert_revocation("b", 1000.0), "issued in the same (whole) second"
    assert st.cert_revocation("b", 1001.0) == "", "a certificate issued afterwards is a new one"
    assert st.cert_revocation("c", 999.0) == ""
    st.apply(3, 1, cert_revoke_command("b", 900.0))  # an older time never un-revokes
    assert st.cert_revocation("b", 999.0)
    assert not st.apply(4, 1, json.dumps({"op": "cert.revoke", "name": "", "at": 1, "v": 2}).encode()).ok
    assert not st.apply(5, 1, json.dumps({"op": "cert.revoke", "name": "x", "at": "nan", "v": 2}).encode()).ok


def test_snapshots_carry_the_list_and_leave_it_out_while_empty():
    st = ClusterState()
    st.apply(1, 1, cluster_format_command(2))
    assert "revoked_certs" not in json.loads(st.snapshot())
    st.apply(2, 1, cert_revoke_command("b", 1000.0))
    copy = ClusterState()
    copy.restore(st.snapshot())
    assert copy.revoked_certs == {"b": 1000.0} and copy.cert_revocation("b", 10.0)


def test_the_certificate_cache_never_hides_a_revocation():
    """The interceptor parses a certificate once (cache) but asks the revocation list on every call."""
    ca = C.create_ca()
    identity = C.issue_identity(ca, "b", role="node")
    revoked: dict[str, float] = {}
    interceptor = auth.AuthInterceptor(lambda t: None,
                                       revoked=lambda n, at: "revoked" if at <= revoked.get(n, -1) else "")
    cache = interceptor._cert_cache
    caller = auth.cert_caller(identity.cert_pem, cache)
    assert interceptor.refusal(caller) == "" and auth.cert_caller(identity.cert_pem, cache) is caller
    revoked["b"] = caller.issued_at
    assert interceptor.refusal(auth.cert_caller(identity.cert_pem, cache)) == "revoked"


def test_held_hosts_and_tenant_labels_are_the_operators_word_only():
    assert OP_SINCE["node.hold"] == OP_SINCE["node.approve"] == 2
    assert json.loads(node_hold_command("c"))["v"] == 2 and json.loads(node_approve_command("c", ["x"]))["v"] == 2
    st = ClusterState()
    st.apply(1, 1, cluster_format_command(2))
    claimed = {"rack": "r1", "tenant.agentd.io/acme": "true"}
    assert st.trusted_labels("b", claimed) == {"rack": "r1"}, "a host cannot label itself for a tenant"
    plain = {"rack": "r1"}
    assert st.trusted_labels("b", plain) is plain
    assert st.apply(2, 1, node_hold_command("c")).ok and st.held_hosts == {"c"}
    assert st.apply(3, 1, node_approve_command("c", ["acme", "globex", "acme"])).ok
    assert st.held_hosts == set() and st.host_tenants == {"c": ("acme", "globex")}
    assert st.trusted_labels("c", claimed) == {"rack": "r1", "tenant.agentd.io/acme": "true",
                                              "tenant.agentd.io/globex": "true"}
    st.apply(4, 1, node_hold_command("d"))
    copy = ClusterState()
    copy.restore(st.snapshot())
    assert copy.held_hosts == {"d"} and copy.host_tenants == {"c": ("acme", "globex")}
    st.apply(5, 1, node_approve_command("c"))  # approved again without tenants: no longer dedicated
    assert "c" not in st.host_tenants
    assert not st.apply(6, 1, json.dumps({"op": "node.approve", "name": "c", "tenants": [""], "v": 2}).encode()).ok


def test_a_rotated_secret_keys_new_instances_and_running_ones_keep_theirs():
    old, new, newer = "o" * 64, "n" * 64, "w" * 64
    st = ClusterState()
    st.apply(1, 1, cluster_format_command(2))
    assert json.loads(secret_rotate_command(new))["v"] == 2 and OP_SINCE["secret.rotate"] == 2
    assert not st.apply(2, 1, secret_rotate_command(new)).ok, "nothing to rotate before secret.init"
    st.apply(3, 1, secret_init_command(old))
    st.apply(4, 1, deploy_command(spec(replicas=1), [assignment(generation=1)]))
    running = st.assignments_for("m")[0].instance_id
    result = st.apply(5, 1, secret_rotate_command(new))
    assert result.ok and result.data["instances_on_old_secret"] == 1
    assert st.secret_for(running) == old, "a running server keeps the key it was started with"
    assert st.secret_for("m-r0-g2") == new
    assert model_server_key(st.secret_for(running), running) != model_server_key(new, running)
    copy = ClusterState()
    copy.restore(st.snapshot())
    assert copy.secret_for(running) == old and copy.cluster_secret == new
    # Rotating again would lose `old` while m-r0-g1 still runs with it: refused until it is replaced.
    refused = st.apply(6, 1, secret_rotate_command(newer))
    assert not refused.ok and "m-r0-g1" in refused.message and st.cluster_secret == new
    st.apply(7, 2, assign_command("m", [assignment(generation=2, term=2)], replicas=1))
    assert st.secret_for("m-r0-g2") == new
    assert st.apply(8, 2, secret_rotate_command(newer)).ok
    assert st.secret_for("m-r0-g2") == new and st.secret_for("m-r0-g3") == newer


def test_a_forwarded_call_is_judged_by_the_callers_own_credential():
    """A member forwarding a call carries the caller's bearer token; a certificate caller is redirected."""
    from agentd.security.apikeys import Principal

    ca = C.create_ca()
    node_pem = C.issue_identity(ca, "b", role="node").cert_pem
    admin_pem = C.issue_identity(ca, "alice", role="admin").cert_pem
    principal = Principal(key_id="k1", tenant="ops", admin=True)
    verify = {"good": principal}.get
    forwarded = auth.identify({"x509_pem_cert": [node_pem]}, [("authorization", "Bearer good")], verify)
    assert (forwarded.kind, forwarded.name, forwarded.role, forwarded.via) == ("token", "k1", "admin", "b")
    assert auth.identify({"x509_pem_cert": [node_pem]}, [("authorization", "Bearer bad")], verify) is None
    alone = auth.identify({"x509_pem_cert": [node_pem]}, [], verify)
    assert (alone.kind, alone.role) == ("cert", "node"), "a host's certificate alone is a node, never an admin"
    admin = auth.identify({"x509_pem_cert": [admin_pem]}, [("authorization", "Bearer good")], verify)
    assert (admin.kind, admin.name) == ("cert", "alice")

    assert auth.forward_metadata("b", "x-fwd", "10.0.0.1:7070", caller=forwarded) == (
        ("x-fwd", "b"), ("authorization", "Bearer good"))
    try:
        auth.forward_metadata("b", "x-fwd", "10.0.0.1:7070", caller=admin)
        raise AssertionError("a certificate caller must be redirected")
    except auth.Redirect as r:
        assert r.address == "10.0.0.1:7070" and "10.0.0.1:7070" in str(r)
    assert auth.forward_metadata("b", "x-fwd", "a:1", caller=auth.Caller(auth.INSECURE, "", "admin")) == (
        ("x-fwd", "b"),)
