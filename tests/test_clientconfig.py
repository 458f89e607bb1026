"""The client commands' settings reader agrees with the full loader, or hands over to it."""

from pathlib import Path

import pytest

from agentd import clientconfig
from agentd.clientconfig import ClientSettings, client_settings
from agentd.config import load_settings
from agentd.errors import ConfigError

FIELDS = ("listen", "token_listen", "insecure", "tls_dir", "data_dir", "tls_directory", "token_listen_address")

# (TOML text, environment) the reader answers itself.
PLAIN = [
    ("", {}),
    ('listen = "10.0.0.5:9000"\ninsecure = true\n', {}),
    ('listen = "10.0.0.5:9000"\n', {"AGENTD_LISTEN": "127.0.0.1:7777", "AGENTD_INSECURE": "yes"}),
    ('data_dir = "/srv/agentd"\nnode_name = "x"\n[labels]\nrack = "a"\n', {"AGENTD_INSECURE": "0"}),
    ('tls_dir = "/etc/agentd/tls"\ntoken_listen = "0.0.0.0:7443"\n', {"agentd_insecure": "TRUE"}),
    ("", {"AGENTD_TLS_DIR": "/tmp/admin", "AGENTD_TOKEN_LISTEN": "127.0.0.1:9999", "AGENTD_LISTEN": "[::1]:7070"}),
    ('heartbeat_interval = "800ms"\n', {}),  # a daemon-only setting: not the client's business (see below)
]

# Values the reader leaves to the full loader: both must agree, error or not.
UNSURE = [
    ('listen = "nowhere"\n', {}),
    ("", {"AGENTD_LISTEN": "127.0.0.1:99999"}),
    ("", {"AGENTD_INSECURE": "maybe"}),
    ("", {"AGENTD_INSECURE": " true"}),
    ("insecure = 1\n", {}),
    ('insecure = "yes"\n', {}),
    ("listen = 7070\n", {}),
    ('tls_dir = ""\n', {}),
    ('listen = "127.0.0.1:7070"\ntoken_listen = "127.0.0.1:7070"\n', {}),
    ('listen = "127.0.0.1:65535"\n', {}),
    ('listen = "127.0.0.1:0"\n', {}),
    ("this is = = not toml", {}),
]


def _setup(tmp_path: Path, monkeypatch, toml: str, env: dict[str, str]) -> None:
    cfg = tmp_path / "agentd.toml"
    cfg.write_text(toml)
    monkeypatch.setenv("AGENTD_CONFIG", str(cfg))
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def _project(s) -> tuple:
    return tuple(getattr(s, f) for f in FIELDS)


@pytest.mark.parametrize("toml,env", PLAIN)
def test_plain_settings_are_read_without_pydantic_and_agree(tmp_path, monkeypatch, toml, env):
    _setup(tmp_path, monkeypatch, toml, env)
    import os

    fast = clientconfig._read(os.environ)  # no _Unsure: answered without the full loader
    if "heartbeat_interval" in toml:
        with pytest.raises(ConfigError):
            load_settings()
        return
    assert _project(fast) == _project(load_settings())


@pytest.mark.parametrize("toml,env", UNSURE)
def test_anything_unusual_goes_through_the_full_loader(tmp_path, monkeypatch, toml, env):
    _setup(tmp_path, monkeypatch, toml, env)
    try:
        expected = _project(load_settings())
    except ConfigError as exc:
        with pytest.raises(ConfigError) as err:
            client_settings()
        assert str(err.value) == str(exc)
    else:
        assert _project(client_settings()) == expected


def test_a_missing_config_file_named_by_agentd_config_is_the_loaders_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTD_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        client_settings()


def test_no_file_at_the_default_path_means_defaults(monkeypatch):
    monkeypatch.delenv("AGENTD_CONFIG")
    monkeypatch.setattr(clientconfig, "DEFAULT_CONFIG_PATH", Path("/nonexistent/agentd.toml"))
    assert client_settings() == ClientSettings()
    assert client_settings().token_listen_address == "127.0.0.1:7071"
