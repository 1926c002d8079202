from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ingestd.config import (
    ProcessorRule,
    StoreSettings,
    effective_settings_json,
    load_settings,
    route_table,
)
from ingestd.errors import ConfigError
from tests.support.config import SHIPPED_CONFIG

ROUTE = '\n[[routes]]\ntopic = "s/{sensor}/{metric}"\nformat = "value"\n'


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_settings(path)


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    return str(info.value)


def test_shipped_config_is_valid_and_matches_the_model_defaults() -> None:
    settings = load_settings(SHIPPED_CONFIG)
    assert settings.mqtt.ack == "after_commit"
    assert [r.topic for r in settings.routes] == [
        "sensors/{sensor}/telemetry",
        "sensors/{sensor}/{metric}",
        "spBv1.0/#",
    ]
    # Every documented default in the file equals the model's default.
    defaults = type(settings.mqtt)()
    assert settings.mqtt == defaults
    assert settings.batch == type(settings.batch)()
    assert settings.store == type(settings.store)()
    assert settings.bus == type(settings.bus)()
    assert settings.daemon == type(settings.daemon)()
    assert settings.metrics == type(settings.metrics)()
    assert settings.input == type(settings.input)()
    p = settings.processor
    assert (p.max_future_seconds, p.max_age_days) == (300.0, 3650.0)


def test_every_model_key_is_documented_in_the_shipped_config() -> None:
    text = SHIPPED_CONFIG.read_text()
    settings = load_settings(SHIPPED_CONFIG)
    for section in (
        "daemon",
        "mqtt",
        "batch",
        "store",
        "bus",
        "metrics",
        "input",
        "processor",
        "rollups",
    ):
        model = getattr(settings, section)
        for key in type(model).model_fields:
            if key in ("retention", "rules"):  # arrays of tables
                assert f"[[{section}.{key}]]" in text, f"{section}.{key}"
                continue
            if key in ("tls", "limits", "scaling", "spool", "kinds"):
                assert f"[{section}.{key}]" in text, f"{section}.{key}"
                continue
            assert f"\n{key} = " in text or f"\n# {key} = " in text, f"{section}.{key}"
    for key in type(settings.mqtt.tls).model_fields:
        assert f"\n{key} = " in text or f"\n# {key} = " in text, f"mqtt.tls.{key}"
    # Commented out: refused without store.url, which the shipped file leaves empty.
    spool = text[text.index("\n# [store.spool]") :].split("\n[", 1)[0]
    for key in type(settings.store.spool).model_fields:
        assert f"\n# {key} = " in spool, f"store.spool.{key}"
    for key in type(settings.routes[0]).model_fields:
        assert f"#   {key}" in text, f"routes.{key}"
    rules = text[text.index("Keys of a rule:") :].split("\n# [[processor.rules]]\n")[0]
    for key in ProcessorRule.model_fields:
        assert f"#   {key} " in rules, f"processor.rules.{key}"


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGESTD_MQTT__PORT", "18830")
    monkeypatch.setenv("INGESTD_STORE__PATH", "/tmp/x.db")
    settings = load_settings(SHIPPED_CONFIG)
    assert settings.mqtt.port == 18830
    assert str(settings.store.path) == "/tmp/x.db"
    assert settings.mqtt.host == "127.0.0.1"  # the rest of [mqtt] still comes from the file


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[mqtt]\nport = 2000\n" + ROUTE)
    monkeypatch.setenv("INGESTD_CONFIG", str(path))
    assert load_settings(None).mqtt.port == 2000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[mqtt]\nport = 0\n" + ROUTE, "mqtt.port: Input should be greater than or equal to 1"),
        ('[mqtt]\nprotocol = "4"\n' + ROUTE, "mqtt.protocol"),
        ('[mqtt]\nhots = "x"\n' + ROUTE, "mqtt.hots: unknown key"),
        ('[storage]\npath = "x"\n' + ROUTE, "storage: unknown key"),
        (
            "[mqtt]\nreconnect_min_delay = 5\nreconnect_max_delay = 1\n" + ROUTE,
            "reconnect_max_delay must not be below reconnect_min_delay",
        ),
        (
            "[processor.limits]\ntemperature = { min = 5, max = 1 }\n" + ROUTE,
            "processor.limits.temperature: min (5.0) is above max (1.0)",
        ),
        ("[mqtt]\n", "no [[routes]] configured"),
        ('[[routes]]\ntopic = "a/#/b"\n', "'#' must be the last level"),
        ('[[routes]]\ntopic = "a/x{y}"\n', "mixes text with a wildcard"),
        (
            '[[routes]]\ntopic = "a/{sensor}"\nformat = "value"\n',
            "metric template '{metric}' uses {metric}, which topic 'a/{sensor}' does not name",
        ),
        ('[[routes]]\ntopic = "a/{sensor}"\nqos = 3\n', "routes[0].qos"),
        ('[[routes]]\ntopic = "a/{sensor}"\nformat = "xml"\n', "routes[0].format"),
        ('[mqtt.tls]\nkey_file = "k"\n' + ROUTE, "key_file is set but cert_file is not"),
        ('[mqtt]\nshared_group = "a/b"\n' + ROUTE, "mqtt.shared_group"),
        # Non-finite numbers pass every comparison the wrong way: rejected where written.
        (
            "[processor.limits]\ntemperature = { min = nan }\n" + ROUTE,
            "processor.limits.temperature.min: Input should be a finite number",
        ),
        (
            "[processor.scaling]\np = { scale = nan }\n" + ROUTE,
            "processor.scaling.p.scale: Input should be a finite number",
        ),
        (
            "[processor.scaling]\np = { offset = -inf }\n" + ROUTE,
            "processor.scaling.p.offset: Input should be a finite number",
        ),
        (
            "[processor]\nmax_future_seconds = inf\n" + ROUTE,
            "processor.max_future_seconds: Input should be a finite number",
        ),
        # A format's own keys are checked by the format: another format's key is named.
        (
            '[[routes]]\ntopic = "a/{sensor}"\nsensor_tag = "host"\n',
            "routes[0].sensor_tag: not a key of json routes (their own keys: exclude_fields,",
        ),
        (
            '[[routes]]\ntopic = "a/{sensor}"\nformat = "influx"\ntimestamp_unit = "iso"\n',
            "routes[0].timestamp_unit: Input should be 'auto', 's', 'ms', 'us' or 'ns'",
        ),
        (
            '[[routes]]\ntopic = "a/{sensor}"\nformat = "value"\ntimestamp_field = "t"\n',
            "routes[0].timestamp_field: not a key of value routes (their own keys: none;",
        ),
        # A payload with several fields needs {field}, or they all get one name.
        (
            '[[routes]]\ntopic = "a/{sensor}"\nmetric = "temperature"\n',
            "metric template 'temperature' must contain {field}",
        ),
        (
            '[[routes]]\ntopic = "a/{sensor}"\nformat = "senml"\nmetric = "x"\n',
            "must contain {field}",
        ),
        (
            '[[routes]]\ntopic = "a/{sensor}"\nformat = "influx"\nmetric = "{measurement}"\n',
            "must contain {field}",
        ),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    message = _error(tmp_path, text)
    assert str(tmp_path / "c.toml") in message
    assert expected in message


def test_env_error_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGESTD_BATCH__MAX_READINGS", "lots")
    message = _error(tmp_path, ROUTE)
    assert "batch.max_readings" in message
    assert "from environment variable INGESTD_BATCH__MAX_READINGS" in message


@pytest.mark.parametrize(
    "name",
    [
        "INGESTD_MQTT_PORT",
        "INGESTD_MQQT__PORT",
        "INGESTD_MQTT__PROT",
        "INGESTD_PROCESSOR__LIMITS__T__MAXIMUM",
    ],
)
def test_env_typos_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "1")
    message = _error(tmp_path, ROUTE)
    assert f"{name}: environment variable names no setting" in message


def test_env_names_of_real_settings_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INGESTD_MQTT__TLS__ENABLED", "false")
    monkeypatch.setenv("INGESTD_PROCESSOR__LIMITS__T__MAX", "5")
    path = tmp_path / "c.toml"
    path.write_text(ROUTE)
    assert load_settings(path).processor.limits["t"].max == 5


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "missing.toml")
    message = _error(tmp_path, "[mqtt\n")
    assert "not valid TOML" in message
    assert "line 1" in message


def test_effective_settings_mask_the_password(tmp_path: Path) -> None:
    settings = _load(tmp_path, '[mqtt]\nusername = "u"\npassword = "s3cret"\n' + ROUTE)
    text = effective_settings_json(settings)  # type: ignore[arg-type]
    assert "s3cret" not in text
    assert '"password": "**********"' in text


def test_route_table_from_settings(tmp_path: Path) -> None:
    settings = load_settings(SHIPPED_CONFIG)
    table = route_table(settings)
    match = table.match("sensors/kitchen/telemetry")
    assert match is not None
    assert (match.fmt.name, match.sensor) == ("json", "kitchen")
    value = table.match("sensors/kitchen/co2")
    assert value is not None
    assert (value.fmt.name, value.sensor, value.metric_prefix) == ("value", "kitchen", "co2")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://db/x", "store.url: 'mysql://db/x': expected postgresql://"),
        ("postgresql://ingest:s3cret@db/x", "store.url: the URL carries a password"),
        ("postgresql://ingest:s3cret@db1,db2:5433/x", "store.url: the URL carries a password"),
        (
            "postgresql://ingest@db1,,db2/x",
            "store.url: host '' in 'db1,,db2': expected host[:port]",
        ),
        ("postgresql://ingest@db1:54x/x", "store.url: host 'db1:54x' in 'db1:54x': expected"),
        (
            "postgresql://ingest@db1,db2/x?target_session_attrs=standby",
            "store.url: target_session_attrs=standby: ingestd writes",
        ),
        (
            "postgresql://ingest@db1,db2/x?target_session_attrs=any",
            "use read-write (what ingestd asks for when the URL does not say) or primary",
        ),
    ],
)
def test_store_url_errors_name_the_key(tmp_path: Path, url: str, expected: str) -> None:
    message = _error(tmp_path, f'[store]\nurl = "{url}"\n' + ROUTE)
    assert expected in message
    assert "s3cret" not in message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://ingest@127.0.0.1:5432,127.0.0.1:5433/x?target_session_attrs=read-write",
        "postgresql://ingest@db1,db2:5433,[::1]:5434/x",
        "postgres://db1:5432,db2:5432/x?target_session_attrs=primary&sslmode=prefer",
        "postgresql:///x",
    ],
)
def test_a_url_of_several_hosts_is_a_store_url(tmp_path: Path, url: str) -> None:
    settings = _load(tmp_path, f'[store]\nurl = "{url}"\n' + ROUTE)
    assert settings.store.url == url  # type: ignore[attr-defined]


def test_a_url_to_read_from_may_name_a_standby() -> None:
    """`--db` only reads: a standby will do; store.url is written to."""
    url = "postgresql://ingest@db1,db2/x?target_session_attrs=prefer-standby"
    assert StoreSettings.model_validate({"url": url}, context={"reading": True}).url == url
    with pytest.raises(ValidationError, match="ingestd writes"):
        StoreSettings.model_validate({"url": url})


def test_a_postgresql_url_without_asyncpg_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "asyncpg" else real(name, *a)
    )
    message = _error(tmp_path, '[store]\nurl = "postgresql://db/x"\n' + ROUTE)
    assert "store.url: a PostgreSQL URL, but asyncpg is not installed: pip install" in message
