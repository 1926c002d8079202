"""Settings: one TOML file, every key overridable from the environment.

The file is `--config PATH` (or `$INGESTD_CONFIG`). Any key can be overridden
as `INGESTD_<SECTION>__<KEY>`, e.g. `INGESTD_MQTT__PORT=18830`. Every key is
documented once, in `config/ingestd.toml`; this model must match it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ingestd import formats
from ingestd.errors import ConfigError, RouteSpecError
from ingestd.formats import FormatOptions
from ingestd.formats.base import InputLimits, RouteOptions
from ingestd.mqtt.topics import filters_meet
from ingestd.rollups import RollupPlan, parse_interval
from ingestd.routes import CompiledRoute, RouteTable, compile_route

ENV_PREFIX = "INGESTD_"
ENV_CONFIG = "INGESTD_CONFIG"


class Section(BaseModel):
    # NaN or Infinity in a limit, a scale or a delay passes every comparison
    # the wrong way: reject it where it is written.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DaemonSettings(Section):
    stop_timeout: float = Field(10.0, gt=0)
    stall_timeout: float = Field(60.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    log_summary_interval: float = Field(60.0, ge=0)


class TlsSettings(Section):
    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsSettings:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set but cert_file is not; set both or neither")
        return self


class MqttSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    client_id: str = Field(
        "ingestd-{hostname}", min_length=1, max_length=65535, validate_default=True
    )
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    keepalive: int = Field(30, ge=5, le=65535)
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    persistent_session: bool = True
    session_expiry: int = Field(86400, ge=0)
    ack: Literal["after_commit", "on_receive"] = "after_commit"
    max_inflight: int = Field(1000, ge=1, le=65535)
    broker_max_inflight: int = Field(20, ge=0, le=65535)
    shared_group: str = Field("", pattern=r"^[^/+#]*$")
    # Sparkplug B host application id: publish spBv1.0/STATE/<id> (retained,
    # with its will) so edge nodes know a primary host is there. "": none.
    sparkplug_host_id: str = Field("", pattern=r"^[^/+#]*$")
    # In a shared group: the client id of the primary role, which reads the
    # routes only one reader can follow (""): ingestd-primary-<shared_group>.
    primary_client_id: str = Field("", max_length=65535)
    watch_broker_drops: bool = True
    reconnect_min_delay: float = Field(0.5, gt=0)
    reconnect_max_delay: float = Field(30.0, gt=0)
    tls: TlsSettings = TlsSettings()

    @field_validator("client_id", mode="after")
    @classmethod
    def _expand_hostname(cls, value: str) -> str:
        # Unique per machine and stable across restarts: the broker keeps the
        # persistent session under this id.
        return value.replace("{hostname}", socket.gethostname())

    @model_validator(mode="after")
    def _delays_ordered(self) -> MqttSettings:
        if self.reconnect_max_delay < self.reconnect_min_delay:
            raise ValueError("reconnect_max_delay must not be below reconnect_min_delay")
        return self

    @model_validator(mode="after")
    def _password_from_file(self) -> MqttSettings:
        """`password_file`'s content becomes `password` (never in argv or logs).

        A relative name is looked up in systemd's $CREDENTIALS_DIRECTORY
        (LoadCredential=) when the daemon runs with one. An empty file means
        no password.
        """
        if self.password_file is None:
            return self
        if self.password is not None:
            raise ValueError("password and password_file are both set; keep one")
        secret = read_secret_file(self.password_file)
        object.__setattr__(self, "password", SecretStr(secret) if secret else None)
        return self


class RouteSettings(Section):
    """A route: the keys every route takes are fields here; the keys of its
    format (`timestamp_field`, `sensor_tag`, ...) are the format's options,
    validated against it (`ingestd.formats`)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    topic: str = Field(min_length=1)
    qos: Literal[0, 1, 2] = 1
    format: str = "json"
    sensor: str | None = None
    metric: str | None = None
    rate_limit: float = Field(0.0, ge=0)
    rate_burst: float = Field(0.0, ge=0)
    rate_policy: Literal["drop", "quarantine"] = "drop"
    retained: Literal["ignore", "store"] | None = None
    expect_within: float = Field(0.0, ge=0)
    # This route's own, by metric: they win over [processor.limits] and
    # [processor.scaling] for its readings (ingestd.metric_rules).
    limits: dict[str, Limit] = Field(default_factory=dict)
    scaling: dict[str, Scaling] = Field(default_factory=dict)

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        try:
            formats.get(value)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        return value

    @model_validator(mode="after")
    def _compiles(self) -> RouteSettings:
        self.format_options()  # a ValidationError here names the route's key
        try:
            self.compile()
        except RouteSpecError as exc:
            raise ValueError(str(exc)) from None
        return self

    def one_reader(self) -> str | None:
        """Why this route needs one reader of all its messages (None: it does not):
        in a shared group, the primary reads it (`ingestd.primary`)."""
        fmt = formats.get(self.format)
        if fmt.unshareable:
            return fmt.unshareable
        if getattr(self.format_options(), "sequence_field", ""):
            return (
                "a device's message counter cannot be followed on part of its messages: "
                "each member would count the others' as gaps"
            )
        return None

    def format_options(self) -> FormatOptions:
        """This route's keys beyond the common ones, validated by its format."""
        fmt = formats.get(self.format)
        extra = self.model_extra or {}
        unknown = [k for k in extra if k not in fmt.options.model_fields]
        if unknown:
            takes = ", ".join(fmt.option_names()) or "none"
            raise ValidationError.from_exception_data(
                "RouteSettings",
                [
                    {
                        "type": "value_error",
                        "loc": (key,),
                        "input": extra[key],
                        "ctx": {
                            "error": ValueError(
                                f"not a key of {fmt.name} routes (their own keys: {takes}; "
                                "check the spelling against config/ingestd.toml)"
                            )
                        },
                    }
                    for key in unknown
                ],
            )
        return fmt.options.model_validate(extra)

    @model_serializer(mode="wrap")
    def _with_format_options(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Dumped (check-config) with every key in effect, the format's too."""
        data: dict[str, Any] = handler(self)
        data.update(self.format_options().model_dump(mode="json"))
        data["sensor"], data["retained"] = self.effective_sensor, self.effective_retained
        return data

    def compile(self, index: int = 0) -> CompiledRoute:
        options = RouteOptions(
            rate_limit=self.rate_limit,
            rate_burst=self.rate_burst or max(self.rate_limit, 1.0),
            rate_policy=self.rate_policy,
            retained=self.effective_retained,
            expect_within=self.expect_within,
        )
        return compile_route(
            self.topic,
            self.effective_sensor,
            self.effective_metric,
            self.format,
            index,
            options,
            self.format_options(),
        )

    @property
    def effective_sensor(self) -> str:
        return self.sensor if self.sensor is not None else formats.get(self.format).default_sensor

    @property
    def effective_retained(self) -> str:
        if self.retained is not None:
            return self.retained
        return formats.get(self.format).default_retained

    @property
    def effective_metric(self) -> str:
        if self.metric is not None:
            return self.metric
        return formats.get(self.format).default_metric


class Limit(Section):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Limit:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class Scaling(Section):
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""


class ProcessorRule(Section):
    """`[[processor.rules]]`: a limit, a scaling or both for one metric of the
    sensors a glob names; it wins over the route's and the global ones."""

    sensor: str = Field(min_length=1)
    metric: str = Field(min_length=1)
    min: float | None = None
    max: float | None = None
    scale: float | None = None
    offset: float | None = None
    unit: str | None = None

    @model_validator(mode="after")
    def _says_something(self) -> ProcessorRule:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        if self.limit() is None and self.scaling() is None:
            raise ValueError("a rule sets min/max (a limit), scale/offset/unit (a scaling) or both")
        return self

    def limit(self) -> Limit | None:
        """Its limit (whole: a bound it leaves out is open), or None: it sets none."""
        if self.min is None and self.max is None:
            return None
        return Limit(min=self.min, max=self.max)

    def scaling(self) -> Scaling | None:
        if self.scale is None and self.offset is None and self.unit is None:
            return None
        return Scaling(
            scale=1.0 if self.scale is None else self.scale,
            offset=self.offset or 0.0,
            unit=self.unit or "",
        )


class ProcessorSettings(Section):
    limits: dict[str, Limit] = Field(default_factory=dict)
    scaling: dict[str, Scaling] = Field(default_factory=dict)
    rules: list[ProcessorRule] = Field(default_factory=list)
    # Seconds of traffic after which a limit or scaling key that applied to no
    # reading is reported (0: never).
    report_unmatched_after: float = Field(3600.0, ge=0)
    # metric -> "gauge" (the default) or "counter" (a monotonic total: its
    # rollups carry the increase, resets and glitches taken into account).
    kinds: dict[str, Literal["gauge", "counter"]] = Field(default_factory=dict)
    max_future_seconds: float = Field(300.0, ge=0)
    max_age_days: float = Field(3650.0, ge=0)


class InputSettings(Section):
    # Also bounds one packet: ingestd.mqtt.link.max_packet_size.
    max_payload_bytes: int = Field(262144, ge=1)
    max_json_depth: int = Field(16, ge=1, le=256)


class BusSettings(Section):
    stage_queue_size: int = Field(16, ge=1)
    observer_queue_size: int = Field(256, ge=1)


class BatchSettings(Section):
    max_readings: int = Field(25000, ge=1)
    max_delay_ms: int = Field(200, ge=0)


class RollupSettings(Section):
    # Per series and bucket of each interval, kept in the same transaction as
    # the readings (ingestd.store.rollups); views rollup_<interval>.
    enabled: bool = True
    intervals: list[str] = Field(default_factory=lambda: ["1m", "1h"])
    # Days each interval's rollups are kept (0: forever); an interval not
    # named here is kept forever.
    keep_days: dict[str, float] = Field(default_factory=lambda: {"1m": 90.0})
    # Gauges' readings reach the rollup rows when closed (ingestd.closing):
    # every close_seconds, sooner once close_readings are pending.
    close_seconds: float = Field(60.0, gt=0)
    close_readings: int = Field(100_000, ge=1)

    @field_validator("intervals")
    @classmethod
    def _intervals(cls, intervals: list[str]) -> list[str]:
        widths = [parse_interval(i) for i in intervals]
        if len(set(widths)) != len(widths):
            raise ValueError("an interval is named twice")
        return intervals

    @field_validator("keep_days")
    @classmethod
    def _keep(cls, keep: dict[str, float]) -> dict[str, float]:
        for name, days in keep.items():
            parse_interval(name)
            if days < 0:
                raise ValueError(f"{name}: days must be 0 (forever) or more")
        return keep

    def plan(self, counters: Iterable[str]) -> RollupPlan:
        if not self.enabled or not self.intervals:
            return RollupPlan()
        widths = tuple(sorted(parse_interval(i) for i in self.intervals))
        keep = {parse_interval(k): v for k, v in self.keep_days.items()}
        return RollupPlan(widths, {w: keep.get(w, 0.0) for w in widths}, frozenset(counters))


class SpoolSettings(Section):
    # With store.url: batches the store cannot take (unreachable, failing, or
    # slower than after_ms) go to a local SQLite file, are acknowledged, and
    # are forwarded when the store is back (see ingestd.spool).
    enabled: bool = True
    # Unset: next to store.path, as <store.path's name>-spool.db.
    path: Path | None = None
    max_bytes: int = Field(1 << 30, ge=1 << 20)
    after_ms: int = Field(5000, ge=100)


class RetentionRule(Section):
    # Raw readings of the sensors this glob matches (* and ?) are kept this
    # many days instead of store.retention_days (0: forever); the first rule
    # that matches a sensor applies. Rollups are never removed by it.
    sensor: str = Field(min_length=1)
    days: float = Field(ge=0)


class StoreSettings(Section):
    # "" (SQLite at `path`) or postgresql://user@host:port/db, or several
    # hosts (host1:port,host2:port: the one that takes writes is written to;
    # PG* environment variables fill in what the URL leaves out; the password
    # from `password_file` or PGPASSWORD/PGPASSFILE, never in the URL).
    url: str = ""
    password_file: Path | None = None
    path: Path = Path("var/ingestd.db")
    synchronous: Literal["full", "normal"] = "full"
    busy_timeout_ms: int = Field(1000, ge=0)
    retry_min_delay: float = Field(0.1, gt=0)
    retry_max_delay: float = Field(5.0, gt=0)
    retention_days: float = Field(0.0, ge=0)
    retention: list[RetentionRule] = Field(default_factory=list)
    maintenance_interval: float = Field(300.0, gt=0)
    retention_batch: int = Field(5000, ge=1)
    # Batches wait while the filesystem of `path` (or of the spool) has less
    # free; None: 5% of it, at most 100 MiB (ingestd.diskguard); 0: no guard.
    min_free_bytes: int | None = Field(None, ge=0)
    # The first open checks the SQLite file for at most this long (quick_check).
    check_seconds: float = Field(5.0, ge=0)
    # PostgreSQL only.
    statement_timeout_ms: int = Field(30000, ge=0)
    partition_days: int = Field(1, ge=1, le=366)
    partitions_ahead: int = Field(3, ge=1, le=366)
    partitions_behind: int = Field(30, ge=0, le=3660)
    spool: SpoolSettings = SpoolSettings()

    @property
    def postgres(self) -> bool:
        return self.url.startswith(("postgresql://", "postgres://"))

    @field_validator("url")
    @classmethod
    def _engine_url(cls, url: str, info: ValidationInfo) -> str:
        """`info.context` {"reading": True}: a URL the CLI only reads from
        (`--db`), which may name a standby."""
        if not url:
            return url
        if not url.startswith(("postgresql://", "postgres://")):
            raise ValueError(
                f"{url.rpartition('@')[2]!r}: expected postgresql://[user@]host[:port]/db "
                "or postgresql://[user@]host1[:port],host2[:port]/db "
                "(or leave it empty for SQLite at store.path)"
            )
        problem = _url_hosts_problem(url)
        if not (info.context or {}).get("reading"):
            problem = problem or _url_attrs_problem(url)
        if problem:
            raise ValueError(problem)
        if _url_password(url):
            raise ValueError(
                "the URL carries a password: it would show in logs and process lists; "
                "put it in store.password_file (or PGPASSWORD / ~/.pgpass)"
            )
        try:
            found = importlib.util.find_spec("asyncpg") is not None
        except ValueError:  # present in sys.modules as None: not importable
            found = False
        if not found:
            raise ValueError(
                "a PostgreSQL URL, but asyncpg is not installed: pip install 'ingestd[postgres]'"
            )
        return url

    @property
    def spool_path(self) -> Path | None:
        """The local spool's file, or None: no spool (SQLite, or disabled)."""
        if not self.postgres or not self.spool.enabled:
            return None
        return self.spool.path or self.path.with_name(f"{self.path.stem}-spool.db")

    @model_validator(mode="after")
    def _spool_needs_url(self) -> StoreSettings:
        given = self.spool.model_fields_set - ({"enabled"} if not self.spool.enabled else set())
        if not self.url and given:
            raise ValueError(
                "[store.spool] is for store.url (PostgreSQL): SQLite at store.path is "
                "on this machine already and needs no spool; remove the spool keys"
            )
        return self

    @model_validator(mode="after")
    def _password_file(self) -> StoreSettings:
        if self.password_file is not None:
            if not self.url:
                raise ValueError("password_file is for store.url (PostgreSQL)")
            read_secret_file(self.password_file)  # readable now, not at the first outage
        return self

    def password(self) -> str | None:
        """The PostgreSQL password from `password_file` (None: libpq's defaults)."""
        if self.password_file is None:
            return None
        return read_secret_file(self.password_file) or None


def _url_password(url: str) -> bool:
    rest = url.split("://", 1)[1]
    userinfo = rest.split("/", 1)[0].rpartition("@")[0]
    return ":" in userinfo


_HOSTSPEC = re.compile(r"(\[[^\]]+\]|[^\[\]:,]+)(:[0-9]+)?")


def _url_hosts_problem(url: str) -> str | None:
    """What is wrong with the URL's host list (host[:port],host[:port]...)."""
    hosts = urlsplit(url).netloc.rpartition("@")[2]
    if not hosts:
        return None  # libpq's defaults (PGHOST, a local socket)
    for spec in hosts.split(","):
        if not _HOSTSPEC.fullmatch(spec):
            return (
                f"host {spec!r} in {hosts!r}: expected host[:port] (an IPv6 address in "
                "[brackets]), several separated by commas"
            )
    return None


def _url_attrs_problem(url: str) -> str | None:
    """ingestd writes: a target_session_attrs that admits a standby cannot work."""
    for value in parse_qs(urlsplit(url).query).get("target_session_attrs", []):
        if value not in ("read-write", "primary"):
            return (
                f"target_session_attrs={value}: ingestd writes, so it needs a host that "
                "takes writes; use read-write (what ingestd asks for when the URL does "
                "not say) or primary"
            )
    return None


class MetricsSettings(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9799, ge=0, le=65535)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
    )

    daemon: DaemonSettings = DaemonSettings()
    mqtt: MqttSettings = MqttSettings()
    routes: list[RouteSettings] = Field(default_factory=list)
    processor: ProcessorSettings = ProcessorSettings()
    input: InputSettings = InputSettings()
    bus: BusSettings = BusSettings()
    batch: BatchSettings = BatchSettings()
    store: StoreSettings = StoreSettings()
    rollups: RollupSettings = RollupSettings()
    metrics: MetricsSettings = MetricsSettings()

    def rollup_plan(self) -> RollupPlan:
        """What the store keeps of rollups: the intervals and the counters."""
        kinds = self.processor.kinds
        return self.rollups.plan(m for m, kind in kinds.items() if kind == "counter")

    @model_validator(mode="after")
    def _shareable(self) -> Settings:
        """In a shared group, what only one reader can follow (Sparkplug, a
        `sequence_field`, the Sparkplug host STATE) is read by the primary, whom
        the members elect through the PostgreSQL store they share; refused with
        SQLite, and where a shared route's filter reaches the same topics."""
        if not self.mqtt.shared_group:
            return self
        problems: list[tuple[tuple[int | str, ...], Any, str]] = []
        compiled = [r.compile(i) for i, r in enumerate(self.routes)]
        ordered = [i for i, r in enumerate(self.routes) if r.one_reader()]
        if not self.store.postgres:
            why = (
                "in a shared group it is read by one member at a time, the primary, which "
                "the members choose through the PostgreSQL store they share (store.url); "
                "with SQLite each member has its own file and there is nothing to choose "
                "by. Set store.url, or run it on one ingestd outside mqtt.shared_group"
            )
            if self.mqtt.sparkplug_host_id:
                problems.append((("mqtt", "sparkplug_host_id"), self.mqtt.sparkplug_host_id, why))
            for i in ordered:
                route = self.routes[i]
                if formats.get(route.format).unshareable:
                    problems.append((("routes", i, "format"), route.format, why))
                else:
                    field = route.format_options().sequence_field  # type: ignore[attr-defined]
                    problems.append((("routes", i, "sequence_field"), field, why))
        for i in ordered:
            for j, other in enumerate(compiled):
                if j in ordered or not filters_meet(compiled[i].subscription, other.subscription):
                    continue
                problems.append(
                    (
                        ("routes", j, "topic"),
                        self.routes[j].topic,
                        f"it reaches topics of routes[{i}] ({self.routes[i].topic}), which "
                        "only the primary reads: a member would read those messages under "
                        "this route. Make the filters disjoint",
                    )
                )
        if problems:
            raise ValidationError.from_exception_data(
                "Settings",
                [
                    {
                        "type": "value_error",
                        "loc": loc,
                        "input": value,
                        "ctx": {"error": ValueError(f"not with mqtt.shared_group: {why}")},
                    }
                    for loc, value, why in problems
                ],
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's content arrives as init data; the environment overrides it.
        return (env_settings, init_settings)


def credential_path(path: Path) -> Path:
    """A secret file's path: relative names in $CREDENTIALS_DIRECTORY (systemd
    credentials) when that is set, else as given."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and not path.is_absolute():
        return Path(creds) / path
    return path


def read_secret_file(path: Path) -> str:
    """The secret in a file, without its trailing newline."""
    where = credential_path(path)
    try:
        text = where.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"password_file {where}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"password_file {where}: cannot read it ({exc})") from None
    return text.rstrip("\r\n")


def load_settings(path: Path | None, *, need_routes: bool = True) -> Settings:
    """Read, merge and validate the configuration; raise ConfigError naming the key.

    The daemon needs at least one route; the data commands (`query`, ...) only
    need the store's path, so they load without.
    """
    env = os.environ
    if path is None and env.get(ENV_CONFIG):
        path = Path(env[ENV_CONFIG])
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = unknown_env_keys(env)
    if unknown:
        lines = [f"{where}: invalid configuration ({len(unknown)} problem(s)):"]
        lines += [
            f"  {name}: environment variable names no setting (the form is "
            f"INGESTD_<SECTION>__<KEY>, e.g. INGESTD_MQTT__PORT; see config/ingestd.toml)"
            for name in unknown
        ]
        raise ConfigError("\n".join(lines))
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, where, env)) from None
    if need_routes and not settings.routes:
        raise ConfigError(
            f"{where}: invalid configuration (1 problem(s)):\n  routes: no "
            "[[routes]] configured: ingestd would subscribe to nothing"
        )
    return settings


def unknown_env_keys(env: Mapping[str, str]) -> list[str]:
    """INGESTD_* variables that name no setting: a typo there would otherwise be
    ignored silently while the file's (or the default) value applies."""
    unknown: list[str] = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        annotation: Any = Settings
        free_key = False
        for part in path:
            if free_key:  # a key of a dict-valued setting (processor.limits.<metric>)
                free_key = False
                continue
            fields = getattr(_model_of(annotation), "model_fields", None)
            if fields is None or part not in fields:
                unknown.append(name)
                break
            annotation = fields[part].annotation
            if getattr(annotation, "__origin__", None) is dict:
                free_key, annotation = True, annotation.__args__[1]
    return unknown


def _model_of(annotation: Any) -> Any:
    """The pydantic model inside an annotation (X, X | None), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
        return annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _describe(exc: ValidationError, where: str, env: Mapping[str, str]) -> str:
    lines = [f"{where}: invalid configuration ({exc.error_count()} problem(s)):"]
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        key = _dotted(loc)
        env_name = ENV_PREFIX + "__".join(str(p).upper() for p in loc if isinstance(p, str))
        origin = f" (from environment variable {env_name})" if env_name in env else ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against config/ingestd.toml)"
        got = ""
        if "input" in err and err["type"] not in ("missing", "extra_forbidden"):
            got = f" (got {_short(err['input'])})"
        lines.append(f"  {key or '<top level>'}: {msg}{got}{origin}")
    return "\n".join(lines)


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


_URL_SECRET = re.compile(r"(://[^:/@\s\"']+:)[^@\s\"']+@")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    text = _URL_SECRET.sub(r"\1***@", text)  # a password written into a URL is not echoed
    return text if len(text) <= 80 else text[:77] + "..."


def effective_settings_json(settings: Settings) -> str:
    """The merged settings as JSON, secrets masked; what `check-config` prints."""
    return json.dumps(settings.model_dump(mode="json"), indent=2, sort_keys=False)


def route_table(settings: Settings) -> RouteTable:
    inp = settings.input
    limits = InputLimits(max_payload_bytes=inp.max_payload_bytes, max_json_depth=inp.max_json_depth)
    return RouteTable([r.compile(i) for i, r in enumerate(settings.routes)], limits)
