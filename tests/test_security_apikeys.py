"""API keys: shown once, stored hashed, tenant- and model-scoped, revocation is a state change."""

from __future__ import annotations

import json
import random

import pytest

from agentd.errors import InvalidInput
from agentd.security import apikeys as K

T0 = 1_900_000_000.0


def rng(seed: int = 3):
    r = random.Random(seed)
    return lambda n: r.randbytes(n)


def make(store=None, seed=3, **kw):
    kw.setdefault("tenant", "acme")
    secret, rec = K.new_api_key(now=T0, random_bytes=rng(seed), **kw)
    return secret, K.add_key(store or {}, rec)


def test_key_verifies_and_secret_is_not_stored():
    secret, store = make(models=["llama-8b", "llama-8b", "qwen"], name="ci")
    assert secret.startswith("agd_") and len(secret) == 4 + 10 + 1 + 52
    (rec,) = store.values()
    assert secret.split("_")[2] not in json.dumps(K.store_to_json(store))
    assert rec.models == ("llama-8b", "qwen")
    p = K.verify_key(store, secret, now=T0 + 1)
    assert p == K.Principal(key_id=rec.id, tenant="acme", models=frozenset({"llama-8b", "qwen"}), admin=False)


@pytest.mark.parametrize("presented", ["", "Bearer x", "agd_short_x", "sk-openai-style"])
def test_garbage_keys_are_refused(presented):
    _, store = make()
    assert K.verify_key(store, presented, now=T0) is None


def test_wrong_secret_with_a_real_id_is_refused():
    secret, store = make()
    tampered = secret[:-1] + ("a" if secret[-1] != "a" else "b")
    assert K.verify_key(store, tampered, now=T0) is None


def test_revoked_key_is_refused_and_revocation_is_idempotent():
    secret, store = make()
    (kid,) = store
    store2, rec = K.revoke_key(store, kid, now=T0 + 5)
    assert rec.revoked_at == T0 + 5 and rec.state(T0 + 6) == "revoked"
    assert K.verify_key(store2, secret, now=T0 + 6) is None
    assert K.verify_key(store, secret, now=T0 + 6) is not None, "the input store is unchanged"
    store3, rec3 = K.revoke_key(store2, kid, now=T0 + 9)
    assert rec3.revoked_at == T0 + 5 and store3 == store2
    with pytest.raises(InvalidInput, match="keys ls"):
        K.revoke_key(store, "nosuchkey0", now=T0)


def test_expired_key_is_refused():
    secret, store = make(ttl=10)
    assert K.verify_key(store, secret, now=T0 + 9) is not None
    assert K.verify_key(store, secret, now=T0 + 10) is None


def test_principal_scoping_by_tenant_and_models():
    p = K.Principal("k", "acme", frozenset({"a"}))
    assert p.may_use("a", "acme")
    assert not p.may_use("b", "acme")
    assert not p.may_use("a", "globex"), "another tenant's model of the same name"
    assert K.Principal("k", "acme").may_use("anything", "acme")
    assert K.Principal("k", "acme", admin=True).may_use("x", "globex")


def test_input_validation():
    with pytest.raises(InvalidInput, match="tenant"):
        make(tenant="a b")
    with pytest.raises(InvalidInput, match="model name"):
        make(models=["ok", "$(reboot)"])
    for ttl in (0, -5, float("nan"), float("inf"), 11 * 365 * 86400):  # each gave a key that never expires
        with pytest.raises(InvalidInput, match="positive"):
            make(ttl=ttl)
    for name in ("acme\n", "acme\r\n", "\nacme"):  # Python's `$` matches before a trailing newline
        with pytest.raises(InvalidInput, match="tenant"):
            make(tenant=name)
    _, store = make(models=["*"])
    assert next(iter(store.values())).models == ()


def test_store_json_round_trip_and_damage():
    _, store = make()
    _, store = make(store, seed=4, tenant="globex", admin=True)
    assert K.store_from_json(json.loads(json.dumps(K.store_to_json(store)))) == store
    with pytest.raises(InvalidInput, match=r"keys\[0\] is not an object"):
        K.store_from_json({"keys": [1]})
    with pytest.raises(InvalidInput, match="expected"):
        K.store_from_json([])
    assert [r.tenant for r in K.list_keys(store)] == ["acme", "globex"]


def test_model_server_keys_are_per_instance_and_need_the_secret():
    secret = K.new_cluster_secret(rng(9))
    a = K.model_server_key(secret, "tiny-r0-g1")
    assert a == K.model_server_key(secret, "tiny-r0-g1"), "every agent derives the same key"
    assert a != K.model_server_key(secret, "tiny-r0-g2") != K.model_server_key(secret, "tiny-r1-g1")
    assert a != K.model_server_key(K.new_cluster_secret(rng(10)), "tiny-r0-g1")
    assert secret not in a and a.startswith("agdsrv_")
    with pytest.raises(InvalidInput, match="no cluster secret"):
        K.model_server_key("", "tiny-r0-g1")


def test_names_with_a_trailing_newline_are_refused_everywhere():
    from pydantic import ValidationError

    from agentd.runtime.spec import ProcessSpec
    from agentd.security.ca import check_name
    from agentd.types import DeploymentSpec

    with pytest.raises(InvalidInput):
        check_name("gpu-1\n")
    with pytest.raises(ValidationError):
        DeploymentSpec(name="chat\n", model="/m.gguf", runtime="llamabox")
    with pytest.raises(ValidationError):
        DeploymentSpec(name="chat", model="/m.gguf", runtime="llamabox", tenant="acme\n")
    with pytest.raises(ValidationError):
        ProcessSpec(name="main\n", argv=("x",))
    assert K.parse_key("agd_" + "a" * 10 + "_" + "b" * 52 + "\n") is None
