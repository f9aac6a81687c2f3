"""TLS to the databases: `MYSQL_*_URL` options (`?ssl-mode=...&ssl-ca=...`) against a private
MariaDB that requires secure transport, with a CA and certificates made here."""
from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pymysql
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from app import config, db
from app.config import ConfigError, MySQLURL, Settings
from app.ingest.generator import Rates, generate_files
from tests import ground_truth, servers
from tests.pipeline_harness import Pipeline, check_against_truth

# -- certificates ---------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(folder: Path, stem: str, key, cert) -> tuple[Path, Path]:
    key_path, cert_path = folder / f"{stem}-key.pem", folder / f"{stem}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def make_ca(folder: Path, stem: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(f"{stem} test CA")).issuer_name(_name(f"{stem} test CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    path, _ = _write(folder, stem, key, cert)
    return path, key, cert


def issue(folder: Path, stem: str, ca, cn: str, dns: list[str] = (), ips: list[str] = (), client: bool = False):
    _, ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                     else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    alt = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return _write(folder, stem, key, builder.sign(ca_key, hashes.SHA256()))


class Certs:
    def __init__(self, folder: Path):
        self.folder = folder
        ca = make_ca(folder, "ca")
        self.ca = ca[0]
        self.wrong_ca = make_ca(folder, "other-ca")[0]
        # Issued for the name `localhost` only: connecting to 127.0.0.1 is a different identity.
        self.server_cert, self.server_key = issue(folder, "server", ca, "localhost", dns=["localhost"])
        self.client_cert, self.client_key = issue(folder, "client", ca, "pipeline-client", client=True)


@pytest.fixture(scope="module")
def tls_server():
    """A private mariadbd that speaks only TLS (`--require-secure-transport=ON`) with a
    certificate from a CA made here, and a user that must show a client certificate."""
    folder = Path(tempfile.mkdtemp(prefix="pipeline-tls-"))
    certs = Certs(folder)
    server = servers.MariaDB(folder / "data", options=[
        f"--ssl-ca={certs.ca}", f"--ssl-cert={certs.server_cert}", f"--ssl-key={certs.server_key}",
        "--require-secure-transport=ON"])
    server.install().start()
    try:
        conn = servers.admin_connect(unix_socket=str(server.socket))
        with conn.cursor() as cur:
            for name in ("pipeline_db", "shop_shard_0", "shop_shard_1"):
                cur.execute(f"CREATE DATABASE {name}")
            cur.execute("CREATE USER 'mtls'@'%' IDENTIFIED BY 'mtls-secret' REQUIRE X509")
            cur.execute("GRANT ALL ON *.* TO 'mtls'@'%'")
        conn.close()
        yield server, certs
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def url(server, options: str = "", host: str = "localhost", user: str = "root:", database: str = "pipeline_db"):
    return MySQLURL.parse("MYSQL_PIPELINE_URL", f"mysql://{user}@{host}:{server.port}/{database}"
                                                + (f"?{options}" if options else ""))


def cipher(conn) -> str:
    with conn.cursor() as cur:
        cur.execute("SHOW STATUS LIKE 'Ssl_cipher'")
        return cur.fetchone()[1]


# -- against the server ---------------------------------------------------------------------------


def test_verified_connection_is_encrypted_and_reuses_one_context(tls_server):
    server, certs = tls_server
    target = url(server, f"ssl-ca={certs.ca}&ssl-mode=VERIFY_IDENTITY")
    first, second = db.connect(target), db.connect(target, database=None)
    try:
        assert cipher(first) and cipher(second)
        # One SSL context per URL: a reconnect does not read the CA again.
        assert first.ctx is second.ctx is target.tls.context()
    finally:
        first.close()
        second.close()
    conns = db.ThreadConnections(url(server, f"ssl-ca={certs.ca}"), check_after=0)
    before = conns.get()
    conns.discard()
    after = conns.get()
    assert before is not after and after.ctx is first.ctx and cipher(after)
    conns.discard()


def test_identity_is_checked_against_the_host_name(tls_server):
    server, certs = tls_server
    # The certificate names `localhost`, not 127.0.0.1: the identity check refuses it...
    with pytest.raises(pymysql.err.OperationalError, match="(?i)certificate verify failed.*(mismatch|match)"):
        db.connect(url(server, f"ssl-ca={certs.ca}&ssl-mode=VERIFY_IDENTITY", host="127.0.0.1"))
    # ...while VERIFY_CA checks the issuer only, and REQUIRED only encrypts.
    for options in (f"ssl-ca={certs.ca}&ssl-mode=VERIFY_CA", "ssl-mode=REQUIRED"):
        conn = db.connect(url(server, options, host="127.0.0.1"))
        assert cipher(conn)
        conn.close()


def test_wrong_ca_is_refused_with_a_clear_error(tls_server):
    server, certs = tls_server
    with pytest.raises(pymysql.err.OperationalError, match="(?i)certificate verify failed"):
        db.connect(url(server, f"ssl-ca={certs.wrong_ca}"))


def test_without_tls_options_the_server_refuses(tls_server):
    server, _ = tls_server
    # MariaDB answers a plain connection under require_secure_transport with "Access denied"
    # (MySQL: "insecure transport are prohibited"); the same account over TLS is let in.
    with pytest.raises(pymysql.err.OperationalError, match="(?i)access denied|insecure transport"):
        db.connect(url(server))
    conn = db.connect(url(server, "ssl-mode=REQUIRED"))
    assert cipher(conn)
    conn.close()


def test_client_certificate_for_mutual_tls(tls_server):
    server, certs = tls_server
    target = url(server, f"ssl-ca={certs.ca}&ssl-cert={certs.client_cert}&ssl-key={certs.client_key}",
                 user="mtls:mtls-secret")
    conn = db.connect(target)
    with conn.cursor() as cur:
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchone()[0].startswith("mtls@")
    assert cipher(conn)
    conn.close()
    with pytest.raises(pymysql.err.OperationalError, match="(?i)access denied"):
        db.connect(url(server, f"ssl-ca={certs.ca}", user="mtls:mtls-secret"))


def test_api_is_ready_over_tls_and_says_why_not_with_a_wrong_ca(tls_server, tmp_path, api_factory):
    server, certs = tls_server
    token = {"Authorization": "Bearer tls-test-token-0123456789"}   # /ready says why only to the token
    env = servers.service_env(url(server, f"ssl-ca={certs.ca}"), tmp_path / "shared", servers.free_port(),
                              PIPELINE_API_TOKEN=token["Authorization"][7:])
    api = api_factory(env)
    answer = requests.get(f"{api.base}/ready", headers=token, timeout=10)
    assert answer.status_code == 200
    assert answer.json()["database"] == f"mysql://root@localhost:{server.port}/pipeline_db?ssl-mode=VERIFY_IDENTITY"

    wrong = servers.service_env(url(server, f"ssl-ca={certs.wrong_ca}"), tmp_path / "shared", servers.free_port(),
                                PIPELINE_API_TOKEN=token["Authorization"][7:])
    proc = servers.Process("app.apid", [], wrong, tmp_path / "logs" / "wrong-ca.log").start()
    try:
        def answer():
            return [requests.get(f"http://127.0.0.1:{wrong['PIPELINE_API_PORT']}/api/v1/pipeline/ready",
                                 headers=token, timeout=5)]
        [answer] = servers.wait_until(answer, 30, what="pipeline-apid with a wrong CA answering")
        assert answer.status_code == 503
        assert "certificate verify failed" in answer.json()["error"].lower()
    finally:
        proc.stop()


def test_whole_pipeline_over_tls_matches_the_ground_truth(tls_server, tmp_path):
    """Every daemon connects over TLS (the server accepts nothing else): the API, the
    splitter's order index, the workers' state and the senders' LOAD DATA LOCAL."""
    server, certs = tls_server
    options = f"ssl-ca={certs.ca}&ssl-mode=VERIFY_IDENTITY"
    source = tmp_path / "generated"
    names = list(generate_files(source, 4, 200, seed=151, rates=Rates(duplicate=0.03, return_first=0.03),
                                start="20260301000000"))
    truth = ground_truth.compute(sorted(source.glob(f"*{ground_truth.SUFFIX}")))
    shard_dbs = [url(server, options, database=f"shop_shard_{n}") for n in range(2)]
    pipe = Pipeline(tmp_path / "run", url(server, options), shard_dbs).start()
    try:
        assert pipe.import_files(source) == names
        pipe.wait_loaded(len(names), timeout=120)
        check_against_truth(pipe, truth, names)
        senders = "".join(p.output() for n, p in pipe.daemons.items() if n.startswith("mysql-sender"))
        assert "ssl-mode=VERIFY_IDENTITY ready (method load_data)" in senders, senders[-2000:]
        assert "refuses LOAD DATA LOCAL" not in senders, senders[-2000:]
    finally:
        codes = pipe.stop()
    assert all(code == 0 for code in codes.values()), codes


# -- the options, read by app/config.py -----------------------------------------------------------


def parse(options: str, password: str = "s3cret") -> MySQLURL:
    return MySQLURL.parse("MYSQL_SHARD_1_URL", f"mysql://app:{password}@db.example:3306/shop_shard_1?{options}")


@pytest.fixture(scope="module")
def pem(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pem")
    ca = make_ca(folder, "ca")
    cert, key = issue(folder, "client", ca, "client", client=True)
    garbage = folder / "garbage.pem"
    garbage.write_text("not a certificate\n")
    return {"ca": ca[0], "cert": cert, "key": key, "garbage": garbage, "folder": folder}


def test_no_options_means_no_tls_and_options_are_read_as_mysql_clients_name_them(pem):
    assert parse("").tls is None and parse("ssl-mode=DISABLED").tls is None
    assert parse(f"ssl-ca={pem['ca']}").tls == config.TLS("VERIFY_IDENTITY", str(pem["ca"]))
    assert parse(f"ssl_ca={pem['ca']}&ssl_mode=verify_ca").tls.mode == "VERIFY_CA"
    assert parse("ssl-mode=required").tls == config.TLS("REQUIRED")
    assert parse(f"ssl-ca={pem['ca']}&ssl-verify-server-cert=true").tls.mode == "VERIFY_IDENTITY"
    assert parse("ssl-verify-server-cert=false").tls.mode == "REQUIRED"
    mutual = parse(f"ssl-ca={pem['ca']}&ssl-cert={pem['cert']}&ssl-key={pem['key']}").tls
    assert (mutual.cert, mutual.key) == (str(pem["cert"]), str(pem["key"]))
    # Every setting reaches each service through its environment: the URL round-trips.
    url = parse(f"ssl-ca={pem['ca']}&ssl-cert={pem['cert']}&ssl-key={pem['key']}&ssl-mode=VERIFY_CA")
    assert MySQLURL.parse("X", url.secret_text()) == url
    assert url.with_database("other").tls == url.tls


def test_secrets_never_show(pem):
    url = parse(f"ssl-ca={pem['ca']}", password="hunter2-pw")
    for text in (str(url), repr(url), str(url.with_database("x"))):
        assert "hunter2-pw" not in text
    assert str(url) == "mysql://app@db.example:3306/shop_shard_1?ssl-mode=VERIFY_IDENTITY"
    for bad in ("postgres://app:hunter2-pw@h/db", "mysql://app:hunter2-pw@h:port/db",
                "mysql://app:hunter2-pw@h/", "mysql://app:hunter2-pw@h/db?sslmode=x"):
        with pytest.raises(ConfigError) as err:
            MySQLURL.parse("MYSQL_PIPELINE_URL", bad)
        assert "hunter2-pw" not in str(err.value.code), err.value.code


@pytest.mark.parametrize("options,problem", [
    ("ssl-mode=VERIFY_IDENTITY&sslca=/x", "unknown option 'sslca'"),
    ("charset=utf8mb4", "unknown option 'charset'"),
    ("ssl-mode", "malformed options"),
    ("ssl-mode=REQUIRED&&x", "malformed options"),
    ("ssl-mode=", "ssl-mode needs a value"),
    ("ssl-mode=REQUIRED&ssl-mode=REQUIRED", "given twice"),
    ("ssl-mode=SOMETIMES", "ssl-mode must be one of"),
    ("ssl-mode=PREFERRED", "PREFERRED would fall back"),
    ("ssl-mode=REQUIRED&ssl-verify-server-cert=true", "not both"),
    ("ssl-verify-server-cert=maybe", "must be true or false"),
    ("ssl-ca=/no/such/ca.pem", "ssl-ca: no such file /no/such/ca.pem"),
    ("ssl-mode=VERIFY_CA&ssl-cert=/no/such/cert.pem", "ssl-cert: no such file"),
    ("ssl-mode=DISABLED&ssl-ca={ca}", "DISABLED contradicts ssl-ca"),
    ("ssl-mode=REQUIRED&ssl-ca={ca}", "ssl-ca would be ignored"),
    ("ssl-ca={ca}&ssl-key={key}", "ssl-key needs ssl-cert"),
    ("ssl-ca={garbage}", "ssl-ca: cannot read"),
    ("ssl-ca={ca}&ssl-cert={cert}", "ssl-cert/ssl-key: cannot load"),
    ("ssl-ca={ca}&ssl-cert={cert}&ssl-key={ca}", "ssl-cert/ssl-key: cannot load"),
])
def test_a_bad_option_stops_the_service_with_one_line_naming_the_variable(pem, options, problem):
    with pytest.raises(ConfigError) as err:
        parse(options.format(**pem))
    message = err.value.code
    assert message.startswith("config error: MYSQL_SHARD_1_URL: ") and problem in message, message
    assert "\n" not in message and "s3cret" not in message


def test_the_service_exits_at_start_on_a_missing_ca(tmp_path):
    env = servers.service_env(servers.server_url("pipeline_db"), tmp_path, servers.free_port())
    env["MYSQL_PIPELINE_URL"] += "?ssl-ca=/no/such/ca.pem"
    done = subprocess.run([sys.executable, "-m", "app.apid"], cwd=servers.ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "config error: MYSQL_PIPELINE_URL: ssl-ca: no such file /no/such/ca.pem")
    with pytest.raises(ConfigError):
        Settings.from_env(env)
