import pytest

from agentd.config import load_settings, parse_duration
from agentd.errors import ConfigError


@pytest.mark.parametrize("raw,seconds", [(0.5, 0.5), ("500ms", 0.5), ("2s", 2.0), ("1.5", 1.5),
                                         ("2m", 120.0), (3, 3.0)])
def test_parse_duration(raw, seconds):
    assert parse_duration(raw) == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["fast", "-1s", True, "1d", -2])
def test_parse_duration_rejects(raw):
    with pytest.raises(ValueError):
        parse_duration(raw)


def test_precedence_flags_over_env_over_toml_over_defaults(tmp_path, monkeypatch):
    cfg = tmp_path / "agentd.toml"
    cfg.write_text('node_name = "from-toml"\nlisten = "0.0.0.0:9000"\nhttp_listen = "0.0.0.0:9001"\n'
                   'election_timeout_min = "1200ms"\n[labels]\nrack = "a"\n')
    monkeypatch.setenv("AGENTD_CONFIG", str(cfg))
    s = load_settings()
    assert (s.node_name, s.listen, s.labels, s.election_timeout_min) == ("from-toml", "0.0.0.0:9000",
                                                                        {"rack": "a"}, 1.2)
    assert s.heartbeat_interval == 0.1  # default
    monkeypatch.setenv("AGENTD_NODE_NAME", "from-env")
    monkeypatch.setenv("AGENTD_LISTEN", "127.0.0.1:7777")
    s = load_settings()
    assert (s.node_name, s.listen, s.http_listen) == ("from-env", "127.0.0.1:7777", "0.0.0.0:9001")
    s = load_settings(node_name="from-flag", listen=None)
    assert (s.node_name, s.listen) == ("from-flag", "127.0.0.1:7777")


@pytest.mark.parametrize("kw,needle", [
    ({"heartbeat_interval": "400ms"}, "heartbeat_interval × 3"),
    ({"election_timeout_min": "3s", "election_timeout_max": "2s"}, "must not exceed"),
    ({"node_down_grace": "1s"}, "node_down_grace"),
    ({"node_down_grace": "2.2s"}, "too short for reports through a voter"),  # the relay's rule (issue 16)
    ({"listen": "nowhere"}, "HOST:PORT"),
    ({"port_range": (50, 40)}, "port range"),
    ({"no_such_key": 1}, "no_such_key"),
])
def test_invariants_rejected_at_load(kw, needle):
    with pytest.raises(ConfigError) as err:
        load_settings(**kw)
    assert needle in str(err.value)


def test_missing_config_file_named_by_env_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTD_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings()


def test_malformed_toml_is_a_config_error(tmp_path, monkeypatch):
    cfg = tmp_path / "agentd.toml"
    cfg.write_text("this is = = not toml")
    monkeypatch.setenv("AGENTD_CONFIG", str(cfg))
    with pytest.raises(ConfigError):
        load_settings()


def test_comma_separated_lists_from_env(monkeypatch):
    monkeypatch.setenv("AGENTD_JOIN", "10.0.0.1:7070, 10.0.0.2:7070")
    monkeypatch.setenv("AGENTD_DISABLE_PLUGINS", "vllm")
    s = load_settings()
    assert s.join == ["10.0.0.1:7070", "10.0.0.2:7070"]
    assert s.disable_plugins == ["vllm"]


@pytest.mark.parametrize("raw", ["23000,23099", "23000-23099", " 23000 , 23099 ", "[23000, 23099]"])
def test_port_range_spellings_from_env(monkeypatch, raw):
    monkeypatch.setenv("AGENTD_PORT_RANGE", raw)
    assert load_settings().port_range == (23000, 23099)


@pytest.mark.parametrize("raw,needle", [("23000", "not a port range"), ("a,b", "not a port range"),
                                        ("23099,23000", "low <= high")])
def test_bad_port_range_from_env_names_the_setting_not_a_file(tmp_path, monkeypatch, raw, needle):
    monkeypatch.setenv("AGENTD_CONFIG", str(tmp_path / "agentd.toml"))
    (tmp_path / "agentd.toml").write_text('node_name = "n"\n')
    monkeypatch.setenv("AGENTD_PORT_RANGE", raw)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "port_range" in str(err.value) and needle in str(err.value)
    assert str(tmp_path) not in str(err.value)  # the variable is wrong, not the file


def test_labels_from_env(monkeypatch):
    monkeypatch.setenv("AGENTD_LABELS", "rack=a, zone=z1")
    assert load_settings().labels == {"rack": "a", "zone": "z1"}
    monkeypatch.setenv("AGENTD_LABELS", '{"rack": "b"}')
    assert load_settings().labels == {"rack": "b"}
    monkeypatch.setenv("AGENTD_LABELS", "rack")
    with pytest.raises(ConfigError, match=r"labels: .*KEY=VALUE"):
        load_settings()
