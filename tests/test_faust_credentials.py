"""The retrainer's Faust consumer takes the workers' Kafka client settings: mapped onto aiokafka's, or refused.

No SASL or TLS Kafka broker runs here, so the wire cases talk to a listener that speaks just enough of the
protocol (TLS, ApiVersions, SaslHandshake) to see what the retrainer's Faust client sends: the client is
aiokafka's own, given what Faust's driver would give it from the retrainer's app.
"""
from __future__ import annotations

import asyncio
import re
import shutil
import ssl
import struct
import subprocess
from pathlib import Path

import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from model.errors import ConfigError
from stream.faust_credentials import faust_credentials, librdkafka_only

SCRAM = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "shop",
         "sasl.password": "s3cret"}


def _aiokafka(settings: dict[str, str]) -> dict:
    """What Faust's aiokafka driver passes to its consumer and producer for the settings."""
    return credentials_to_aiokafka_auth(faust_credentials(settings))


def test_no_security_settings_connect_in_plaintext():
    assert faust_credentials({"client.id": "retrainer"}) is None
    assert _aiokafka({}) == {"security_protocol": "PLAINTEXT"}


def test_sasl_ssl_with_scram_gives_the_username_password_and_a_verifying_tls_context():
    auth = _aiokafka(SCRAM)
    assert {k: auth[k] for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username",
                                 "sasl_plain_password")} == {"security_protocol": "SASL_SSL",
                                                             "sasl_mechanism": "SCRAM-SHA-512",
                                                             "sasl_plain_username": "shop",
                                                             "sasl_plain_password": "s3cret"}
    ctx = auth["ssl_context"]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname  # librdkafka's defaults


def test_sasl_plaintext_sends_no_tls_and_the_protocol_is_read_in_any_case_as_librdkafka_reads_it():
    auth = _aiokafka({"security.protocol": "sasl_plaintext", "sasl.mechanisms": "PLAIN", "sasl.username": "u",
                      "sasl.password": "p"})
    assert (auth["security_protocol"], auth["sasl_mechanism"], auth["ssl_context"]) == ("SASL_PLAINTEXT", "PLAIN",
                                                                                        None)


@pytest.mark.parametrize("off", ["false", "F", "0"])
def test_turning_off_host_name_or_certificate_checks_is_honoured(off):
    loose = _aiokafka({"security.protocol": "SSL", "ssl.endpoint.identification.algorithm": "none"})["ssl_context"]
    assert not loose.check_hostname and loose.verify_mode == ssl.CERT_REQUIRED
    blind = _aiokafka({"security.protocol": "SSL", "enable.ssl.certificate.verification": off})["ssl_context"]
    assert not blind.check_hostname and blind.verify_mode == ssl.CERT_NONE
    kept = _aiokafka({"security.protocol": "SSL", "enable.ssl.certificate.verification": "T"})["ssl_context"]
    assert kept.check_hostname and kept.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("settings, says", [
    ({"security.protocol": "SASL_SSL", "sasl.username": "u", "sasl.password": "p"}, "no sasl.mechanism"),
    ({"security.protocol": "SASL_SSL", "sasl.mechanism": "GSSAPI"}, "sasl.mechanism=GSSAPI"),
    ({"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER"}, "sasl.mechanism=OAUTHBEARER"),
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN", "sasl.username": "u"}, "sasl.password"),
    ({"security.protocol": "TLS"}, "security.protocol=TLS"),
    ({"security.protocol": "SSL", "ssl.keystore.location": "/k.p12"}, "ssl.keystore.location"),
    ({"sasl.oauthbearer.config": "x"}, "sasl.oauthbearer.config"),
    ({"security.protocol": "SSL", "ssl.ca.location": "/no/such/ca.pem"}, "ssl.ca.location=/no/such/ca.pem"),
    ({"security.protocol": "SSL", "ssl.certificate.location": "/etc/hostname"}, "ssl.key.location"),
    ({"security.protocol": "SSL", "ssl.endpoint.identification.algorithm": "dns"}, "is not https or none"),
    ({"security.protocol": "SSL", "enable.ssl.certificate.verification": "no"}, "is not a boolean"),
    # librdkafka takes mechanism names in upper case only, and the alias set last: a merged table has no order
    ({**SCRAM, "sasl.mechanism": "scram-sha-512"}, "sasl.mechanism=scram-sha-512"),
    ({**SCRAM, "sasl.mechanisms": "PLAIN"}, "name different mechanisms (PLAIN, SCRAM-SHA-512)"),
])
def test_a_security_setting_the_consumer_cannot_apply_is_refused_by_name_not_dropped(settings, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        faust_credentials(settings)


def test_a_file_that_is_no_certificate_is_refused_naming_the_setting(tmp_path):
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=f"ssl.ca.location={junk}"):
        faust_credentials({"security.protocol": "SSL", "ssl.ca.location": str(junk)})


def test_an_encrypted_client_key_needs_its_password_and_is_never_asked_for(tmp_path, certificate):
    """Without ssl.key.password OpenSSL would prompt on the terminal, stalling a service: it is refused instead."""
    cert, key = certificate
    locked = tmp_path / "client.key"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:k3y", "-out", str(locked)],
                   check=True, capture_output=True)
    client = {"security.protocol": "SSL", "ssl.certificate.location": str(cert), "ssl.key.location": str(locked)}
    assert faust_credentials({**client, "ssl.key.password": "k3y"}) is not None
    with pytest.raises(ConfigError, match="ssl.key.location="):
        faust_credentials(client)


def test_settings_outside_security_are_left_to_the_librdkafka_clients():
    assert librdkafka_only({**SCRAM, "client.id": "r", "socket.keepalive.enable": "true"}) == [
        "client.id", "socket.keepalive.enable"]


# --- on the wire ---

@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and its key (the test's CA and broker certificate at once)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "broker.pem", d / "broker.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


class SaslListener:
    """Speaks TLS and the first two requests of a SASL login (ApiVersions, SaslHandshake v0) as a broker would,
    records the mechanism and the first SASL token the client sends, then hangs up."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.mechanisms: list[str] = []
        self.tokens: list[bytes] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from aiokafka.protocol.admin import ApiVersionResponse_v0, SaslHandShakeResponse_v0

        try:
            while True:
                body = await reader.readexactly(struct.unpack(">i", await reader.readexactly(4))[0])
                if self.mechanisms:  # after a v0 handshake the token comes bare, without a request header
                    self.tokens.append(body)
                    return
                api_key, _version, correlation, client_id_len = struct.unpack(">hhih", body[:10])
                if api_key == 18:
                    response = ApiVersionResponse_v0(0, [(17, 0, 0), (18, 0, 0)])
                else:  # 17, SaslHandshake: the mechanism follows the client id
                    at = 10 + max(client_id_len, 0)
                    mechanism = body[at + 2:at + 2 + struct.unpack(">h", body[at:at + 2])[0]].decode()
                    self.mechanisms.append(mechanism)
                    response = SaslHandShakeResponse_v0(0, [mechanism])
                payload = struct.pack(">i", correlation) + response.encode()
                writer.write(struct.pack(">i", len(payload)) + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


def _retrainer_app_credentials(tmp_path: Path, monkeypatch, kafka: dict[str, str]):
    """The credentials of the Faust app `hrnn retrainer --kafka-config ...` builds (no broker reached)."""
    import stream.retrainer as retrainer

    monkeypatch.setattr(retrainer.RetrainerService, "_admin", None)
    svc = retrainer.RetrainerService(retrainer.RetrainerSettings(
        bootstrap_servers="localhost:9", registry=str(tmp_path / "r"), archive=str(tmp_path / "a"), kafka=kafka))
    return svc.app.conf.broker_credentials


def _login(credentials, listener: SaslListener) -> None:
    """Let aiokafka connect with what Faust's driver gives it for the credentials; the listener hangs up."""
    from aiokafka.client import AIOKafkaClient

    async def go() -> None:
        port = await listener.start()
        client = AIOKafkaClient(bootstrap_servers=f"localhost:{port}", request_timeout_ms=5000,
                                **credentials_to_aiokafka_auth(credentials))
        try:
            with pytest.raises(Exception):  # noqa: B017 (the listener never finishes a login)
                await client.bootstrap()
        finally:
            await client.close()
            await listener.stop()

    asyncio.run(go())


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
def test_the_retrainers_consumer_logs_in_over_tls_with_the_workers_settings(tmp_path, monkeypatch, certificate,
                                                                            mechanism):
    cert, key = certificate
    settings = {**SCRAM, "sasl.mechanism": mechanism, "ssl.ca.location": str(cert), "client.id": "retrainer"}
    listener = SaslListener(cert, key)
    _login(_retrainer_app_credentials(tmp_path, monkeypatch, settings), listener)
    assert listener.mechanisms == [mechanism] and len(listener.tokens) == 1
    token = listener.tokens[0]
    if mechanism == "PLAIN":  # RFC 4616: authorization id, user, password
        assert token.split(b"\0")[1:] == [b"shop", b"s3cret"]
    else:  # RFC 5802 client-first message: the user, no password
        assert token.startswith(b"n,,n=shop,r=") and b"s3cret" not in token


def test_the_retrainers_consumer_refuses_a_broker_its_ca_did_not_sign(tmp_path, monkeypatch, certificate):
    """Without ssl.ca.location the system's CAs apply, which never signed the test broker's certificate: the
    TLS handshake fails, so no credentials leave the client."""
    listener = SaslListener(*certificate)
    _login(_retrainer_app_credentials(tmp_path, monkeypatch, {**SCRAM, "sasl.mechanism": "PLAIN"}), listener)
    assert listener.mechanisms == [] and listener.tokens == []
