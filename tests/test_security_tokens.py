"""Join tokens: one-time, expiring, pinned to the CA; consumption is a pure state transition."""

from __future__ import annotations

import random

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from agentd.errors import InvalidInput
from agentd.security import ca as C
from agentd.security import tokens as T
from agentd.security.join import approve_join, csr_node_name, prepare_join

PIN = "sha256:" + "ab" * 32
T0 = 1_900_000_000.0


def rng(seed: int = 1):
    r = random.Random(seed)
    return lambda n: r.randbytes(n)


def new(store=None, *, ttl=600.0, node_name=None, seed=1):
    text, rec = T.create_join_token(PIN, now=T0, ttl=ttl, node_name=node_name, random_bytes=rng(seed))
    return text, T.add_token(store or {}, rec)


def test_token_string_round_trips_and_store_keeps_only_a_hash():
    text, store = new()
    parsed = T.parse_join_token(text)
    assert parsed.ca_pin == PIN
    rec = store[parsed.id]
    assert parsed.secret not in repr(rec)
    assert rec.secret_hash == parsed.secret_hash
    assert T.JoinTokenRecord.from_json(rec.to_json()) == rec


def test_consume_once_then_refused_as_used():
    text, store = new()
    p = T.parse_join_token(text)
    store2, d = T.consume_token(store, p.id, p.secret_hash, now=T0 + 1, node_name="n1")
    assert d.ok and store2[p.id].used_by == "n1"
    assert store[p.id].used_at is None, "the input store is never mutated"
    store3, d2 = T.consume_token(store2, p.id, p.secret_hash, now=T0 + 2, node_name="n2")
    assert not d2.ok and "already used by n1" in d2.reason
    assert store3 == store2


def test_expired_token_is_refused():
    text, store = new(ttl=60)
    p = T.parse_join_token(text)
    _, d = T.consume_token(store, p.id, p.secret_hash, now=T0 + 60, node_name="n1")
    assert not d.ok and "expired" in d.reason
    assert T.check_token(store, p.id, p.secret_hash, now=T0 + 59.9).ok


def test_wrong_secret_and_unknown_id_are_refused():
    text, store = new()
    p = T.parse_join_token(text)
    _, d = T.consume_token(store, p.id, T.hash_secret(p.id, "a" * 32), now=T0, node_name="n1")
    assert not d.ok and "wrong secret" in d.reason
    _, d = T.consume_token(store, "zzzzzzzz", p.secret_hash, now=T0, node_name="n1")
    assert not d.ok and "unknown" in d.reason


def test_token_bound_to_a_node_name():
    text, store = new(node_name="gpu-7")
    p = T.parse_join_token(text)
    assert not T.check_token(store, p.id, p.secret_hash, now=T0, node_name="gpu-8").ok
    assert T.check_token(store, p.id, p.secret_hash, now=T0, node_name="gpu-7").ok


@pytest.mark.parametrize("bad", ["", "abc", "ABCDEFGH." + "a" * 32 + "." + "0" * 64,
                                 "abcdefgh." + "a" * 31 + "." + "0" * 64, "abcdefgh." + "a" * 32 + "." + "0" * 63])
def test_malformed_token_strings_get_a_clear_error(bad):
    with pytest.raises(InvalidInput, match="looks like"):
        T.parse_join_token(bad)


def test_ttl_and_pin_are_validated():
    with pytest.raises(InvalidInput, match="7 days"):
        T.create_join_token(PIN, now=T0, ttl=8 * 86400, random_bytes=rng())
    with pytest.raises(InvalidInput, match="not a CA pin"):
        T.create_join_token("md5:00", now=T0, random_bytes=rng())
    _, store = new()
    _, rec = T.create_join_token(PIN, now=T0, random_bytes=rng(1))
    with pytest.raises(InvalidInput, match="already exists"):
        T.add_token(store, rec)


def test_revoke_and_prune():
    text, store = new()
    p = T.parse_join_token(text)
    assert T.revoke_token(store, p.id) == {}
    with pytest.raises(InvalidInput, match="no join token"):
        T.revoke_token({}, p.id)
    assert p.id in T.prune_tokens(store, now=T0 + 600 + 3600, keep=86400)
    assert T.prune_tokens(store, now=T0 + 600 + 86400) == {}


@given(st.lists(st.tuples(st.sampled_from(["n1", "n2", "n3"]), st.floats(0, 1000), st.booleans()), max_size=12))
def test_property_a_token_is_consumed_at_most_once(attempts):
    text, store = new(ttl=500)
    p = T.parse_join_token(text)
    successes = 0
    for node, t, right_secret in attempts:
        h = p.secret_hash if right_secret else T.hash_secret(p.id, "b" * 32)
        store, d = T.consume_token(store, p.id, h, now=T0 + t, node_name=node)
        successes += d.ok
        assert not d.ok or (right_secret and t < 500)
    assert successes <= 1


def test_join_end_to_end_with_real_ca_and_csr():
    authority = C.create_ca()
    text, rec = T.create_join_token(authority.fingerprint, now=T0, random_bytes=rng())
    store = T.add_token({}, rec)
    prep = prepare_join(text, "gpu-9", ["10.1.0.9:7070"])
    assert prep.token.ca_pin == authority.fingerprint
    assert csr_node_name(prep.csr_pem) == "gpu-9"
    store2, out = approve_join(authority, store, token_id=prep.token.id, secret=prep.token.secret,
                               csr_pem=prep.csr_pem, now=T0 + 3600)
    assert not out.decision.ok and "expired" in out.decision.reason and store2 == store
    store2, out = approve_join(authority, store, token_id=prep.token.id, secret=prep.token.secret,
                               csr_pem=prep.csr_pem, now=T0 + 5)
    assert out.decision.ok and out.ca_pem == authority.cert_pem
    cert = x509.load_pem_x509_certificate(out.cert_pem)
    assert C.cert_role(cert) == "node" and C.cert_name(cert) == "gpu-9"
    _, again = approve_join(authority, store2, token_id=prep.token.id, secret=prep.token.secret,
                            csr_pem=prep.csr_pem, now=T0 + 6)
    assert not again.decision.ok and again.cert_pem is None


# ---------------------------------------------------------------- in the replicated state machine


def test_the_state_machine_uses_a_token_once_even_when_two_signers_race():
    from agentd.cluster import state as S

    text, rec = T.create_join_token(PIN, now=T0, ttl=600.0, random_bytes=rng(5))
    tok = T.parse_join_token(text)
    replicas = [S.ClusterState(), S.ClusterState()]
    log = [S.token_add_command(rec),
           S.token_consume_command(tok.id, tok.secret_hash, "gpu-7", T0 + 1),  # signer 1
           S.token_consume_command(tok.id, tok.secret_hash, "gpu-8", T0 + 1.01)]  # signer 2, same token
    results = [[st.apply(i, 1, cmd) for i, cmd in enumerate(log, 1)] for st in replicas]
    assert [r.ok for r in results[0]] == [True, True, False] == [r.ok for r in results[1]]
    assert "already used by gpu-7" in results[0][2].message
    assert replicas[0].join_tokens == replicas[1].join_tokens
    assert replicas[0].join_tokens[tok.id].used_by == "gpu-7"
    late = S.ClusterState()
    late.apply(1, 1, S.token_add_command(rec))
    assert "expired" in late.apply(2, 1, S.token_consume_command(tok.id, tok.secret_hash, "x", T0 + 601)).message


def test_keys_tokens_and_the_cluster_secret_survive_a_snapshot():
    from agentd.cluster import state as S
    from agentd.security import apikeys as K

    st = S.ClusterState()
    _, key = K.new_api_key(tenant="acme", now=T0, random_bytes=rng(2))
    _, tok = T.create_join_token(PIN, now=T0, random_bytes=rng(3))
    cmds = [S.key_add_command(key), S.key_revoke_command(key.id, T0 + 5), S.token_add_command(tok),
            S.secret_init_command("s" * 64), S.secret_init_command("t" * 64),
            S.key_revoke_command("nosuchkey0", T0), S.key_add_command(key), S.token_revoke_command("zzzzzzzz")]
    ok = [st.apply(i, 1, c).ok for i, c in enumerate(cmds, 1)]
    assert ok == [True, True, True, True, False, False, False, False]
    assert st.cluster_secret == "s" * 64, "the first secret wins"
    assert st.api_keys[key.id].revoked_at == T0 + 5
    bad = st.apply(len(cmds) + 1, 1, b'{"op": "key.add", "record": {"id": 1}}')
    assert not bad.ok and "invalid key.add" in bad.message
    copy = S.ClusterState()
    copy.restore(st.snapshot())
    assert (copy.api_keys, copy.join_tokens, copy.cluster_secret) == (st.api_keys, st.join_tokens, st.cluster_secret)
    old = S.ClusterState()  # a snapshot written before access records existed
    old.restore(b'{"last_index": 3, "last_term": 1, "deployments": [], "assignments": [], "nodes": []}')
    assert (old.api_keys, old.join_tokens, old.cluster_secret) == ({}, {}, "")
