"""Settings for security and operations: defaults, environment, and the errors for bad combinations."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentd.config import load_settings
from agentd.errors import ConfigError


def test_defaults_derive_from_data_dir_and_listen():
    s = load_settings(data_dir=Path("/srv/agentd"), listen="10.0.0.1:9000")
    assert s.tls_directory == Path("/srv/agentd/tls")
    assert s.token_listen_address == "10.0.0.1:9001"
    assert not s.insecure and not s.stops_models_on_exit


def test_stop_models_on_exit_and_its_deprecated_name(monkeypatch):
    assert load_settings(stop_models_on_exit=True).stops_models_on_exit
    monkeypatch.setenv("AGENTD_DRAIN_ON_STOP", "1")  # the name before 0.2.0
    assert load_settings().stops_models_on_exit


def test_environment(monkeypatch):
    monkeypatch.setenv("AGENTD_STOP_MODELS_ON_EXIT", "1")
    monkeypatch.setenv("AGENTD_INSECURE", "true")
    monkeypatch.setenv("AGENTD_PROXY_CONNECT_TIMEOUT", "500ms")
    monkeypatch.setenv("AGENTD_TLS_DIR", "/etc/agentd/tls")
    s = load_settings()
    assert s.stops_models_on_exit and s.insecure and s.proxy_connect_timeout == 0.5
    assert s.tls_directory == Path("/etc/agentd/tls")


@pytest.mark.parametrize(("flags", "message"), [
    ({"token_listen": "127.0.0.1:7070"}, "must differ from listen"),
    ({"token_listen": "nonsense"}, "is not HOST:PORT"),
    ({"listen": "0.0.0.0:65535"}, "set token_listen"),
    ({"http_tls_cert": "/x.crt"}, "go together"),
    ({"proxy_read_timeout": 0}, "must be positive"),
    ({"http_max_body": 10}, "http_max_body"),
])
def test_bad_combinations_are_one_clear_sentence(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(**flags)
