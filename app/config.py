"""Every setting the services read, from environment variables, validated in one place.

A malformed value stops the service at start with one line naming the variable
(`ConfigError`), instead of failing later somewhere far from the cause.
"""
from __future__ import annotations

import functools
import ipaddress
import os
import re
import ssl
import stat
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Mapping
from urllib.parse import parse_qsl, quote, unquote, urlsplit

# Optional indexes of a shard's events table (app/sender/loader.py OPTIONAL_INDEXES).
SHARD_INDEXES = ("order", "type", "user")


class ConfigError(SystemExit):
    """Raised for a bad setting; as a SystemExit it prints one line and exits 2."""

    def __init__(self, variable: str, problem: str):
        self.variable = variable
        super().__init__(f"config error: {variable}: {problem}")
        self.code = f"config error: {variable}: {problem}"


# TLS options of a MYSQL_*_URL, named as the mysql/mariadb command-line clients name them.
TLS_OPTIONS = ("ssl-mode", "ssl-ca", "ssl-cert", "ssl-key", "ssl-verify-server-cert")
TLS_MODES = ("DISABLED", "REQUIRED", "VERIFY_CA", "VERIFY_IDENTITY")


@dataclass(frozen=True)
class TLS:
    """How to encrypt the connections to one server (the URL's `?ssl-...` options).

    REQUIRED encrypts without checking who answers; VERIFY_CA also checks the server's
    certificate against `ca` (or the system's CAs); VERIFY_IDENTITY also checks that it was
    issued for the URL's host name. `cert`/`key`: a client certificate for mutual TLS."""

    mode: str
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def context(self) -> ssl.SSLContext:
        """The SSL context, built once per process and reused by every connect: building it
        reads the CA file (the system bundle costs ~25 ms), which a reconnect must not pay."""
        return _tls_context(self)

    def query(self) -> str:
        options = [("ssl-mode", self.mode), ("ssl-ca", self.ca), ("ssl-cert", self.cert), ("ssl-key", self.key)]
        return "&".join(f"{k}={quote(v, safe='/')}" for k, v in options if v)


def _no_key_password() -> bytes:
    """Without a password callback, OpenSSL would prompt on the terminal for an encrypted key."""
    return b""


@functools.lru_cache(maxsize=None)
def _tls_context(tls: TLS) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # MySQL's self-made certificates lack extensions that strict X.509 checking demands.
    ctx.verify_flags &= ~ssl.VERIFY_X509_STRICT
    if tls.mode == "REQUIRED":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.check_hostname = tls.mode == "VERIFY_IDENTITY"
        if tls.ca:
            try:
                ctx.load_verify_locations(cafile=tls.ca)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"ssl-ca: cannot read {tls.ca} as PEM certificates ({exc})") from None
        else:
            ctx.load_default_certs()
    if tls.cert:
        try:
            ctx.load_cert_chain(tls.cert, tls.key, password=_no_key_password)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"ssl-cert/ssl-key: cannot load {tls.cert} with {tls.key or 'its own key'} "
                             f"(a PEM certificate and its unencrypted key: {exc})") from None
    return ctx


def _redacted(url: str) -> str:
    """The URL as an error message may show it: the password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _parse_tls(variable: str, query: str) -> TLS | None:
    """The TLS options of a URL's query; None (TLS off) when there are none."""
    if not query:
        return None
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ConfigError(variable, f"malformed options {query!r}: expected name=value&name=value") from None
    given: dict[str, str] = {}
    for name, value in pairs:
        option = name.strip().lower().replace("_", "-")
        if option not in TLS_OPTIONS:
            raise ConfigError(variable, f"unknown option {name!r} (known: {', '.join(TLS_OPTIONS)})")
        if option in given:
            raise ConfigError(variable, f"option {option} is given twice")
        if not value.strip():
            raise ConfigError(variable, f"option {option} needs a value")
        given[option] = value.strip()
    if "ssl-mode" in given and "ssl-verify-server-cert" in given:
        raise ConfigError(variable, "give ssl-mode or ssl-verify-server-cert, not both")
    if "ssl-verify-server-cert" in given:
        verify = given["ssl-verify-server-cert"].lower()
        if verify not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError(variable, f"ssl-verify-server-cert must be true or false, got {verify!r}")
        mode = "VERIFY_IDENTITY" if verify in ("1", "true", "yes", "on") else "REQUIRED"
    else:
        mode = given.get("ssl-mode", "VERIFY_IDENTITY").upper().replace("-", "_")
    if mode == "PREFERRED":
        raise ConfigError(variable, "ssl-mode=PREFERRED would fall back to an unencrypted connection unnoticed: "
                                    "use REQUIRED, VERIFY_CA or VERIFY_IDENTITY (or DISABLED)")
    if mode not in TLS_MODES:
        raise ConfigError(variable, f"ssl-mode must be one of {', '.join(TLS_MODES)}, got {given['ssl-mode']!r}")
    files = {k: given[k] for k in ("ssl-ca", "ssl-cert", "ssl-key") if k in given}
    if mode == "DISABLED":
        if files:
            raise ConfigError(variable, f"ssl-mode=DISABLED contradicts {', '.join(files)}")
        return None
    if mode == "REQUIRED" and "ssl-ca" in files:
        raise ConfigError(variable, "REQUIRED does not check the server's certificate, so ssl-ca would be "
                                    "ignored: use ssl-mode=VERIFY_CA or VERIFY_IDENTITY")
    if "ssl-key" in files and "ssl-cert" not in files:
        raise ConfigError(variable, "ssl-key needs ssl-cert (the client certificate it belongs to)")
    for option, path in files.items():
        if not Path(path).is_file():
            raise ConfigError(variable, f"{option}: no such file {path}")
        files[option] = str(Path(path).absolute())
    tls = TLS(mode, files.get("ssl-ca"), files.get("ssl-cert"), files.get("ssl-key"))
    try:
        tls.context()
    except ValueError as exc:
        raise ConfigError(variable, str(exc)) from None
    return tls


@dataclass(frozen=True)
class MySQLURL:
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    database: str
    tls: TLS | None = None  # None: unencrypted (servers on this machine or a private network)

    @classmethod
    def parse(cls, variable: str, url: str) -> "MySQLURL":
        parts = urlsplit(url)
        if parts.scheme not in ("mysql", "mariadb", "mysql+pymysql"):
            raise ConfigError(variable, f"expected mysql://user:password@host:port/database, got {_redacted(url)!r}")
        try:
            port = parts.port or 3306
        except ValueError:
            raise ConfigError(variable, f"port is not a number in {_redacted(url)!r}") from None
        database = parts.path.lstrip("/")
        if not parts.hostname or not re.fullmatch(r"[0-9A-Za-z_$]{1,64}", database):
            raise ConfigError(variable, f"needs a host and a database name (letters, digits, _), got {_redacted(url)!r}")
        if parts.fragment:
            raise ConfigError(variable, f"unexpected #{parts.fragment} in {_redacted(url)!r}")
        return cls(parts.hostname, port, unquote(parts.username or "root"),
                   unquote(parts.password or ""), database, _parse_tls(variable, parts.query))

    def with_database(self, database: str) -> "MySQLURL":
        return replace(self, database=database)

    def secret_text(self) -> str:
        """The whole URL, password and TLS options included, for a child process's
        environment: never for a log."""
        text = f"mysql://{quote(self.user, safe='')}:{quote(self.password, safe='')}@{self.host}:{self.port}/{self.database}"
        return f"{text}?{self.tls.query()}" if self.tls else text

    def __str__(self) -> str:
        text = f"mysql://{self.user}@{self.host}:{self.port}/{self.database}"
        return f"{text}?ssl-mode={self.tls.mode}" if self.tls else text


def _int(env: Mapping[str, str], name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"must be an integer, got {raw!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(name, f"must be between {lo} and {hi}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, lo: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"must be a number, got {raw!r}") from None
    if value < lo or value != value:
        raise ConfigError(name, f"must be at least {lo}, got {raw!r}")
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(env: Mapping[str, str], name: str, default: float) -> float:
    """Seconds, or a number with a unit: `30`, `30s`, `5m`, `12h`, `7d`."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    m = _DURATION.match(raw)
    if not m:
        raise ConfigError(name, f"must be a duration such as 30, 30s, 5m, 12h or 7d, got {raw!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"must be true or false, got {raw!r}")


def _decimal(env: Mapping[str, str], name: str, default: str) -> Decimal:
    raw = env.get(name) or default
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ConfigError(name, f"must be a decimal amount such as 1000.00, got {raw!r}") from None
    if not value.is_finite() or value < 0:
        raise ConfigError(name, f"must be a non-negative amount, got {raw!r}")
    return value.quantize(Decimal("0.01"))


def _ingest_rates(env: Mapping[str, str]) -> tuple[tuple[str, float], ...]:
    """INGEST_RATE_<NAME>=0.01 for each injected case; the generator checks the names."""
    rates = []
    for name in sorted(k for k in env if k.startswith("INGEST_RATE_")):
        if env[name] != "":
            value = _float(env, name, 0.0)
            if value >= 1:
                raise ConfigError(name, f"must be a probability below 1, got {env[name]!r}")
            rates.append((name[len("INGEST_RATE_"):].lower(), value))
    return tuple(rates)


def _http_url(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name) or default
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, f"must be an http(s) URL, got {raw!r}")
    return raw.rstrip("/")


def _http_urls(env: Mapping[str, str], name: str, default: str) -> str:
    """One or more http(s) URLs, comma-separated: several API instances a daemon fails over
    between (app/client.py). Kept as one string, each part checked and trimmed."""
    raw = env.get(name) or default
    urls = [u.strip() for u in raw.split(",") if u.strip()]
    if not urls:
        raise ConfigError(name, f"must be one or more http(s) URLs, comma-separated, got {raw!r}")
    return ",".join(_http_url({name: u}, name, default) for u in urls)


TOKEN_HINT = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
MIN_NETWORK_TOKEN = 16  # characters of a token guarding an API other machines can reach


def _api_token(env: Mapping[str, str]) -> str | None:
    """PIPELINE_API_TOKEN, else the first line of the file PIPELINE_API_TOKEN_FILE names (a
    container keeps its generated token there, on its volume, so `docker exec` sees it too).
    Set but empty is a mistake (it used to mean "no authentication", silently)."""
    token = env.get("PIPELINE_API_TOKEN")
    path = env.get("PIPELINE_API_TOKEN_FILE")
    variable = "PIPELINE_API_TOKEN"
    if token is not None and not token.strip():
        raise ConfigError(variable, f"is set but empty, which would turn authentication off: set a token "
                                    f"({TOKEN_HINT}) or unset the variable")
    if token is None and path:
        variable = "PIPELINE_API_TOKEN_FILE"
        try:
            with open(path, encoding="utf-8") as handle:
                token = handle.readline().strip()
        except OSError as exc:
            raise ConfigError(variable, f"cannot read {path}: {exc.strerror}") from None
        if not token:
            raise ConfigError(variable, f"{path} is empty")
    if token is not None and not all(33 <= ord(c) < 127 for c in token):
        raise ConfigError(variable, "the token must be printable ASCII without spaces (it travels in an HTTP header)")
    return token


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach an address (a name other than localhost counts as
    reachable: it may resolve to anything)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_api_exposure(settings: "Settings") -> None:
    """pipeline-apid never listens where other machines reach it without a token, unless told
    to (PIPELINE_API_INSECURE=1): ConfigError, one line saying how to set one."""
    host = settings.api_host
    if is_loopback(host):
        return
    token = settings.api_token
    if token is None and not settings.api_insecure:
        raise ConfigError("PIPELINE_API_TOKEN", f"pipeline-apid would listen on {host}:{settings.api_port}, "
                                                f"reachable from other machines, with no token: set "
                                                f"PIPELINE_API_TOKEN to a long random secret ({TOKEN_HINT}), "
                                                f"listen on PIPELINE_API_HOST=127.0.0.1, or set "
                                                f"PIPELINE_API_INSECURE=1 to serve it open on purpose")
    if token is not None and len(token) < MIN_NETWORK_TOKEN:
        raise ConfigError("PIPELINE_API_TOKEN", f"is {len(token)} characters, too short for an API listening on "
                                                f"{host}: at least {MIN_NETWORK_TOKEN} ({TOKEN_HINT})")
def _names(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated subset of `choices` ("" or unset: none), sorted."""
    raw = (env.get(name) or "").strip().lower()
    names = {n.strip() for n in raw.split(",") if n.strip()}
    if names - set(choices):
        raise ConfigError(name, f"must be a comma-separated list of {', '.join(choices)}, got {raw!r}")
    return tuple(sorted(names))


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = (env.get(name) or default).strip().lower()
    if raw not in choices:
        raise ConfigError(name, f"must be one of {', '.join(choices)}, got {raw!r}")
    return raw


@dataclass(frozen=True)
class Rules:
    """Business-rule switches of the shard worker (see docs/business-rules.md)."""

    dedup: bool = True
    balance: bool = True
    stock: bool = True
    shop_active: bool = True
    positive_price: bool = True
    purchase_takes_stock: bool = False
    refund_limit: bool = True


@dataclass(frozen=True)
class Settings:
    pipeline_db: MySQLURL
    shard_count: int
    shard_dbs: tuple[MySQLURL, ...]
    shared_dir: Path
    pipeline_url: str
    api_host: str
    api_port: int
    api_token: str | None
    api_processes: int  # API_WORKERS: gunicorn's worker processes
    api_threads: int
    lease_seconds: float
    max_attempts: int
    reap_interval: float
    poll_min: float
    poll_max: float
    claim_limit: int
    ingest_interval: float
    events_per_file: int
    dedup_window: float      # event time a dedup key is kept (docs/business-rules.md, Windows)
    opening_balance: Decimal
    hold_seconds: float
    hold_wall_cap: float
    rules: Rules = field(default_factory=Rules)
    # The worker's other retention windows (docs/business-rules.md, "Windows and pruning"):
    # ORDER_WINDOW, event time an order stays in the ledger for its return (and as a purchase's
    # dedup key); REPLAY_WINDOW, wall time a decided file's records (decisions, the holds it
    # resolved) are kept so a re-run repeats it byte for byte.
    order_window: float = 30 * 86400.0
    replay_window: float = 86400.0
    # PIPELINE_API_INSECURE=1: pipeline-apid may listen beyond loopback with no token (warned).
    api_insecure: bool = False
    # A request must arrive whole (headers and body) within this many seconds of its first byte,
    # and its answer be read as long; listings and metrics run on API_READ_THREADS threads per
    # API process, apart from the API_THREADS that serve the daemons (app/api/server.py).
    api_request_timeout: float = 10.0
    api_read_threads: int = 1
    # Long-poll claims (`wait=`) sleep on API_WAIT_THREADS threads per API process of their own;
    # one watcher per process reads the task counts every API_WAIT_POLL seconds while any wait.
    # The daemons wait CLAIM_WAIT_SECONDS per claim (0: the old polling, POLL_MIN/MAX_SECONDS).
    api_wait_threads: int = 16
    api_wait_poll: float = 0.1
    claim_wait: float = 2.0
    # A per-shard claim (shard-worker, mysql-sender) that finds fewer tasks than its limit while
    # the previous stage still works on the shard's files waits up to this long for more (0: off).
    claim_linger: float = 0.03
    # pipeline_transitions rows older than this are pruned by the API (one instance at a time).
    transitions_window: float = 7 * 86400.0
    # supervisord's XML-RPC unix socket, for the monitor's process panel (default: the one of
    # the project's supervisord.conf, var/run/supervisor.sock next to it).
    supervisor_socket: str = "var/run/supervisor.sock"
    # Lines the shard worker decides per transaction (its state and decisions commit together).
    worker_batch_lines: int = 8000
    worker_claim_limit: int = 4   # files of its shard a worker claims at once (one claim, one done-batch)
    # mysql-sender's bulk method (load_data: LOAD DATA LOCAL INFILE, falls back to insert when the
    # server refuses LOCAL; insert: multi-row INSERT) and rows per LOAD DATA chunk (docs/sender.md).
    sender_method: str = "load_data"
    sender_chunk_rows: int = 10_000
    # Freed memory (MiB) mysql-sender keeps in its heap for the next file instead of handing it
    # back to the system and faulting it in again (app/heap.py; 0: the C library's default).
    sender_heap_keep_mb: int = 64
    # Every stage's limits on one input line (app/lines.py): a longer line is rejected as
    # too_large, read past in bounded memory; a deeper one as malformed. At most 4 MiB: a line
    # must fit, escaped, in one statement under MariaDB's default max_allowed_packet (16 MiB).
    # At most 32 levels: the shard's JSON column refuses a payload nested deeper than 31
    # (MariaDB's limit), and the payload sits one level down in its line.
    max_line_bytes: int = 1 << 20
    max_json_depth: int = 32
    # The splitter's order index (docs/splitter.md): a return without shop_id sees the purchases
    # of files indexed within this many seconds before its file's first split; rows are kept
    # one window more (so a re-split sees the same) and then pruned by the splitter itself.
    order_index_window: float = 7 * 86400.0
    # Rows of `rejected_lines` (app/rejected.py) older than this are pruned by the splitter.
    rejected_window: float = 7 * 86400.0
    # Optional indexes of each shard's events table (user, order, type; docs/sender.md): each
    # serves a documented question and costs load speed, so none is built unless asked for.
    shard_indexes: tuple[str, ...] = ()
    # event-ingest's generator (docs/ingest.md): seed (None: a random one), injection rates by
    # name from INGEST_RATE_<NAME>, and the size of its world.
    ingest_seed: int | None = None
    ingest_rates: tuple[tuple[str, float], ...] = ()
    ingest_shops: int = 20
    ingest_goods: int = 10
    ingest_users: int = 200

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """The settings of `env`; without one, of this process's environment completed by the
        running local group's `var/run/pipeline.env` (`running_group_env`)."""
        env = running_group_env() if env is None else env
        shard_count = _int(env, "SHARD_COUNT", 2, 1, 64)
        pipeline_db = MySQLURL.parse(
            "MYSQL_PIPELINE_URL", env.get("MYSQL_PIPELINE_URL") or "mysql://root:@127.0.0.1:3306/pipeline_db")
        shard_dbs = tuple(
            MySQLURL.parse(f"MYSQL_SHARD_{n}_URL",
                           env.get(f"MYSQL_SHARD_{n}_URL") or f"mysql://root:@127.0.0.1:3306/shop_shard_{n}")
            for n in range(shard_count))
        lease = _duration(env, "LEASE_SECONDS", 60.0)
        poll_min = _duration(env, "POLL_MIN_SECONDS", 0.02)
        poll_max = _duration(env, "POLL_MAX_SECONDS", 0.2)
        if poll_max < poll_min:
            raise ConfigError("POLL_MAX_SECONDS", f"must be at least POLL_MIN_SECONDS ({poll_min})")
        return cls(
            pipeline_db=pipeline_db,
            shard_count=shard_count,
            shard_dbs=shard_dbs,
            shared_dir=Path(env.get("SHARED_DIR") or "/shared"),
            pipeline_url=_http_urls(env, "PIPELINE_URL", api_url(env.get("PIPELINE_API_HOST") or "127.0.0.1",
                                                                _int(env, "PIPELINE_API_PORT", 8082, 0, 65535))),
            api_host=env.get("PIPELINE_API_HOST") or "127.0.0.1",
            api_port=_int(env, "PIPELINE_API_PORT", 8082, 0, 65535),
            api_token=_api_token(env),
            api_insecure=_bool(env, "PIPELINE_API_INSECURE", False),
            api_request_timeout=max(_duration(env, "API_REQUEST_TIMEOUT", 10.0), 0.5),
            api_read_threads=_int(env, "API_READ_THREADS", 1, 1, 64),
            api_wait_threads=_int(env, "API_WAIT_THREADS", 16, 1, 1024),
            api_wait_poll=min(max(_duration(env, "API_WAIT_POLL", 0.1), 0.01), 5.0),
            claim_wait=min(_duration(env, "CLAIM_WAIT_SECONDS", 2.0), 30.0),
            claim_linger=min(_duration(env, "CLAIM_LINGER_SECONDS", 0.03), 1.0),
            transitions_window=_duration(env, "TRANSITIONS_WINDOW", 7 * 86400.0),
            api_processes=_int(env, "API_WORKERS", 2, 1, 64),
            api_threads=_int(env, "API_THREADS", 4, 1, 256),
            lease_seconds=lease if lease > 0 else 60.0,
            max_attempts=_int(env, "MAX_ATTEMPTS", 5, 1, 1000),
            reap_interval=_duration(env, "REAP_INTERVAL", 5.0),
            poll_min=poll_min,
            poll_max=poll_max,
            claim_limit=_int(env, "CLAIM_LIMIT", 4, 1, 1000),
            ingest_interval=_duration(env, "INGEST_INTERVAL", 10.0),
            events_per_file=_int(env, "EVENTS_PER_FILE", 500, 1, 10_000_000),
            dedup_window=_duration(env, "DEDUP_WINDOW", 7 * 86400.0),
            order_window=_duration(env, "ORDER_WINDOW", 30 * 86400.0),
            replay_window=_duration(env, "REPLAY_WINDOW", 86400.0),
            opening_balance=_decimal(env, "OPENING_BALANCE", "1000.00"),
            hold_seconds=_duration(env, "HOLD_SECONDS", 30.0),
            hold_wall_cap=_duration(env, "HOLD_WALL_CAP_SECONDS", 120.0),
            rules=Rules(
                dedup=_bool(env, "RULE_DEDUP", True),
                balance=_bool(env, "RULE_BALANCE", True),
                stock=_bool(env, "RULE_STOCK", True),
                shop_active=_bool(env, "RULE_SHOP_ACTIVE", True),
                positive_price=_bool(env, "RULE_POSITIVE_PRICE", True),
                purchase_takes_stock=_bool(env, "PURCHASE_TAKES_STOCK", False),
                refund_limit=_bool(env, "RULE_REFUND_LIMIT", True),
            ),
            worker_batch_lines=_int(env, "WORKER_BATCH_LINES", 8000, 1, 100_000),
            worker_claim_limit=_int(env, "WORKER_CLAIM_LIMIT", 4, 1, 100),
            sender_method=_choice(env, "SENDER_METHOD", "load_data", ("load_data", "insert")),
            sender_chunk_rows=_int(env, "SENDER_CHUNK_ROWS", 10_000, 100, 1_000_000),
            sender_heap_keep_mb=_int(env, "SENDER_HEAP_KEEP_MB", 64, 0, 1024),
            max_line_bytes=_int(env, "MAX_LINE_BYTES", 1 << 20, 4096, 4 << 20),
            max_json_depth=_int(env, "MAX_JSON_DEPTH", 32, 2, 32),
            order_index_window=max(_duration(env, "ORDER_INDEX_WINDOW", 7 * 86400.0), 1.0),
            rejected_window=max(_duration(env, "REJECTED_WINDOW", 7 * 86400.0), 1.0),
            shard_indexes=_names(env, "SHARD_INDEXES", SHARD_INDEXES),
            ingest_seed=_int(env, "INGEST_SEED", None, 0, 2**63 - 1),
            ingest_rates=_ingest_rates(env),
            ingest_shops=_int(env, "INGEST_SHOPS", 20, 1, 1_000_000),
            ingest_goods=_int(env, "INGEST_GOODS", 10, 1, 1_000_000),
            ingest_users=_int(env, "INGEST_USERS", 200, 1, 100_000_000),
            supervisor_socket=env.get("SUPERVISOR_SOCKET") or str(Supervision.from_env(env).socket),
        )


API_PATH = "/api/v1/pipeline"


def api_url(host: str, port: int) -> str:
    """Where the daemons reach an API listening on host:port (PIPELINE_URL's default, so a
    changed PIPELINE_API_HOST/PORT is followed): a wildcard address is reached on loopback."""
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{API_PATH}"


# What a local run (`make run`, app/supervision/local_run.py) writes next to its supervisord.conf:
# the settings a shell in the checkout needs to talk to that group. Removed by `make stop`.
RUN_ENV_FILE = "pipeline.env"


def run_env_file(env: Mapping[str, str] | None = None) -> Path:
    return Supervision.from_env(os.environ if env is None else env).run_dir / RUN_ENV_FILE


def read_run_env(path: Path) -> dict[str, str]:
    """KEY=value lines of a run's env file; {} unless it is a regular file of ours that no one
    else may write (it names databases and the API token)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return {}
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            return {}
        pairs = (line.rstrip("\n").partition("=") for line in f)
        return {k: v for k, sep, v in pairs if sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", k)}


def running_group_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, completed with the settings of the local group `make run`
    started in this checkout (var/run/pipeline.env) for every variable the environment does not
    set: so `python -m app.ingest ...` from the checkout talks to that group as the README
    shows. A value the environment sets always wins; without the file nothing changes."""
    env = dict(os.environ if env is None else env)
    try:
        path = run_env_file(env)
    except ConfigError:
        return env
    for key, value in read_run_env(path).items():
        if not env.get(key):
            env[key] = value
    return env


def packaged_supervisord_conf() -> Path:
    """The project's supervisord.conf, package data of app.supervision (in a checkout: the
    top-level file itself, through the link app/supervision/supervisord.conf)."""
    from importlib import resources
    return Path(str(resources.files("app.supervision") / "supervisord.conf")).resolve()


@dataclass(frozen=True)
class Supervision:
    """How supervisord runs the process group (supervisord.conf, app/supervision/)."""

    config_file: Path     # supervisord.conf; its state lives next to it, in var/run
    exit_on_fatal: bool   # a program gone FATAL ends supervisord non-zero (containers)
    splitter_replicas: int = 1  # shard-splitter processes (claims are atomic: any number is safe)
    sender_replicas: int = 1    # mysql-sender processes per shard (loads are exactly-once)
    # With no MYSQL_*_URL set, pipeline-supervise runs a MariaDB of its own with its data here
    # (the container sets it; unset: never).
    embedded_mariadb_dir: Path | None = None

    @property
    def run_dir(self) -> Path:
        """supervisord's socket, pid file and log: `%(here)s/var/run` in supervisord.conf."""
        return self.config_file.parent / "var" / "run"

    @property
    def socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, config_file: Path | None = None) -> "Supervision":
        env = os.environ if env is None else env
        return cls(
            config_file=Path(config_file).absolute() if config_file else packaged_supervisord_conf(),
            exit_on_fatal=_bool(env, "PIPELINE_EXIT_ON_FATAL", False),
            splitter_replicas=_int(env, "SPLITTER_REPLICAS", 1, 1, 32),
            sender_replicas=_int(env, "SENDER_REPLICAS", 1, 1, 32),
            embedded_mariadb_dir=Path(env["EMBEDDED_MARIADB_DIR"]).absolute() if env.get("EMBEDDED_MARIADB_DIR")
            else None,
        )


def database_urls_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether any MYSQL_*_URL is set: if none is, a local run starts its own MariaDB."""
    env = os.environ if env is None else env
    return any(env.get(k) for k in env if k == "MYSQL_PIPELINE_URL" or re.fullmatch(r"MYSQL_SHARD_\d+_URL", k))


def shard_arg(env: Mapping[str, str] | None, argv_shard: int | None, shard_count: int) -> int:
    """The shard of a per-shard daemon: `--shard N` wins over `SHARD_ID`."""
    env = os.environ if env is None else env
    if argv_shard is None:
        if not env.get("SHARD_ID"):
            raise ConfigError("SHARD_ID", "a per-shard service needs --shard N or SHARD_ID")
        argv_shard = _int(env, "SHARD_ID", 0)
    if not 0 <= argv_shard < shard_count:
        raise ConfigError("SHARD_ID", f"must be in [0, {shard_count}), got {argv_shard}")
    return argv_shard
