"""The workers' librdkafka client settings (`--kafka-config`), as the retrainer's Faust app applies them.

The retrainer archives through Faust, whose Kafka client is aiokafka, not librdkafka: its security settings
are mapped here onto Faust's credentials. A security setting with no aiokafka counterpart is refused rather
than dropped, as dropping it could connect without TLS, without a client certificate or as nobody. Settings
outside security (`client.id`, `socket.*`, ...) still reach the retrainer's librdkafka clients (the topic-id
lookup, the announcements).
"""
from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path

from model.errors import ConfigError

PROTOCOLS = ("plaintext", "ssl", "sasl_plaintext", "sasl_ssl")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")  # aiokafka's, without GSSAPI and OAUTHBEARER extras
MAPPED = frozenset({
    "security.protocol", "sasl.mechanism", "sasl.mechanisms", "sasl.username", "sasl.password",
    "ssl.ca.location", "ssl.ca.pem", "ssl.certificate.location", "ssl.key.location", "ssl.key.password",
    "ssl.endpoint.identification.algorithm", "enable.ssl.certificate.verification",
})
_SECURITY_PREFIXES = ("security.", "sasl.", "ssl.", "enable.ssl.")
_FILES = ("ssl.ca.location", "ssl.certificate.location", "ssl.key.location")


def faust_credentials(settings: Mapping[str, str]):
    """Faust credentials (`broker_credentials`) for the settings, None for plaintext; ConfigError naming the
    setting when one cannot be applied as librdkafka would apply it."""
    import faust

    unmapped = sorted(k for k in settings if k.startswith(_SECURITY_PREFIXES) and k not in MAPPED)
    if unmapped:
        raise ConfigError(f"the retrainer's archive consumer (Faust, aiokafka) cannot apply the Kafka client "
                          f"setting(s) {', '.join(unmapped)}; it takes {', '.join(sorted(MAPPED))}")
    protocol = settings.get("security.protocol", "plaintext").lower()
    if protocol not in PROTOCOLS:
        raise ConfigError(f"security.protocol={settings['security.protocol']} is not one of "
                          f"{', '.join(p.upper() for p in PROTOCOLS)}")
    context = _ssl_context(settings) if protocol.endswith("ssl") else None
    if not protocol.startswith("sasl"):
        return faust.SSLCredentials(context) if context is not None else None
    mechanism = _mechanism(settings)
    if mechanism not in MECHANISMS:
        given = f"sasl.mechanism={mechanism}" if mechanism else "no sasl.mechanism (librdkafka's default: GSSAPI)"
        raise ConfigError(f"{given} cannot be used by the retrainer's archive consumer; name one of "
                          f"{', '.join(MECHANISMS)} (upper case, as librdkafka takes them)")
    missing = [k for k in ("sasl.username", "sasl.password") if not settings.get(k)]
    if missing:
        raise ConfigError(f"sasl.mechanism={mechanism} needs {' and '.join(missing)}")
    return faust.SASLCredentials(username=settings["sasl.username"], password=settings["sasl.password"],
                                 mechanism=mechanism, ssl_context=context)


def _mechanism(settings: Mapping[str, str]) -> str:
    """sasl.mechanism, or its alias sasl.mechanisms: librdkafka takes the one set last, an order a merged table
    no longer has, so two different values are refused."""
    named = {settings[k] for k in ("sasl.mechanism", "sasl.mechanisms") if settings.get(k)}
    if len(named) > 1:
        raise ConfigError(f"sasl.mechanism and its alias sasl.mechanisms name different mechanisms "
                          f"({', '.join(sorted(named))}): give one")
    return next(iter(named), "")


def _ssl_context(settings: Mapping[str, str]) -> ssl.SSLContext:
    """A client TLS context as librdkafka builds it: the system's CAs unless ssl.ca.location/.pem names others,
    the broker's host name checked (unless ssl.endpoint.identification.algorithm=none), a client certificate
    when one is named."""
    for key in _FILES:
        path = settings.get(key)
        if path and path != "probe" and not Path(path).exists():
            raise ConfigError(f"{key}={path}: no such file")
    cert, key = settings.get("ssl.certificate.location"), settings.get("ssl.key.location")
    if bool(cert) != bool(key):
        raise ConfigError("ssl.certificate.location and ssl.key.location go together (a client certificate and "
                          "its key)")
    ca = settings.get("ssl.ca.location")
    ca = None if ca in (None, "", "probe") else Path(ca)  # probe: the system's CAs, as without one
    try:
        context = ssl.create_default_context(cafile=ca if ca and not ca.is_dir() else None,
                                             capath=ca if ca and ca.is_dir() else None,
                                             cadata=settings.get("ssl.ca.pem"))
        if cert:
            # without a password, OpenSSL would prompt on the terminal for an encrypted key's: fail instead
            context.load_cert_chain(cert, key, password=settings.get("ssl.key.password") or (lambda: b""))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"the TLS files of the Kafka client settings ({', '.join(_named_files(settings))}) "
                          f"cannot be used: {exc}") from None
    identification = settings.get("ssl.endpoint.identification.algorithm", "https").lower()
    if identification not in ("https", "none"):
        raise ConfigError(f"ssl.endpoint.identification.algorithm={identification} is not https or none")
    context.check_hostname = identification == "https"
    if not _boolean(settings, "enable.ssl.certificate.verification", default=True):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _boolean(settings: Mapping[str, str], key: str, *, default: bool) -> bool:
    """A librdkafka boolean: true/false, t/f or 1/0 in any case; anything else is refused, as librdkafka does."""
    value = settings.get(key)
    if value is None:
        return default
    if value.lower() in ("true", "t", "1"):
        return True
    if value.lower() in ("false", "f", "0"):
        return False
    raise ConfigError(f"{key}={value} is not a boolean (true or false)")


def _named_files(settings: Mapping[str, str]) -> list[str]:
    return [f"{k}={settings[k]}" for k in _FILES if settings.get(k)] or ["the system's CAs"]


def librdkafka_only(settings: Mapping[str, str]) -> list[str]:
    """The settings the retrainer's Faust consumer leaves to its librdkafka clients (none of them security)."""
    return sorted(k for k in settings if k not in MAPPED)
