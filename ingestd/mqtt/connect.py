"""What a broker connection needs around the adapter: the TLS context it is
made with, and what a refused CONNECT or a broker certificate that fails
verification means for the operator.

Both speak in the settings' names (`mqtt.tls.ca_file`, `mqtt.client_id`):
the TLS context's errors are `ConfigError`s naming the key to change, and a
refusal (a CONNACK reason code, MQTT 5's or 3.1.1's mapped onto them by paho)
becomes a hint at the setting most likely wrong. They take plain values, not
the settings model.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from aiomqtt.exceptions import MqttConnectError

from ingestd.errors import ConfigError

# CONNACK refusals worth a hint (MQTT 5 reason codes; paho maps 3.1.1's 1..5 onto them).
_REFUSALS = {
    132: "the broker does not speak this protocol version (check mqtt.protocol)",
    133: "the broker rejected the client id (check mqtt.client_id)",
    134: "not authorized: bad user name or password (check mqtt.username / "
    "mqtt.password or mqtt.password_file)",
    135: "not authorized (check mqtt.username / mqtt.password or mqtt.password_file, "
    "and the broker's ACLs)",
    136: "the broker is unavailable",
    138: "the client id is banned by the broker",
    140: "the broker wants another authentication method",
}


def connect_problem(error: BaseException) -> str | None:
    """What a refused connection means for the operator, or None if it was not refused."""
    if not isinstance(error, MqttConnectError):
        return None
    rc = error.rc
    code = rc if isinstance(rc, int) or rc is None else int(rc.value)
    if code is None:
        return None
    return _REFUSALS.get(code, f"the broker refused the connection ({error})")


def tls_problem(error: BaseException, ca_file: Path | None) -> str | None:
    """What a broker certificate that failed verification means for the
    operator (a configuration problem, not an unreachable broker), or None if
    `error` is something else. aiomqtt raises MqttError(str(ssl error)) with
    the SSL error as its context."""
    seen: BaseException | None = error
    verify: ssl.SSLCertVerificationError | None = None
    for _ in range(5):
        if seen is None or isinstance(seen, ssl.SSLCertVerificationError):
            verify = seen
            break
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    if verify is None and "CERTIFICATE_VERIFY_FAILED" not in text:
        return None
    reason = (verify.verify_message if verify is not None else None) or text
    trusted = f"the CA in {ca_file}" if ca_file else "the system's CA certificates"
    if "hostname" in reason.lower() or "ip address mismatch" in reason.lower():
        return (
            f"the broker's TLS certificate does not name this host ({reason}): "
            "connect with mqtt.host as the certificate names it, or set "
            "mqtt.tls.insecure = true to skip the name check"
        )
    return (
        f"the broker's TLS certificate failed verification ({reason}) against "
        f"{trusted}: set mqtt.tls.ca_file to the CA that signed the broker's certificate"
    )


def tls_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None, insecure: bool
) -> ssl.SSLContext:
    """The context for a TLS connection (`mqtt.tls`): `ca_file`'s certificates
    (the system's without one), a client certificate if `cert_file` is given,
    no host name check if `insecure`."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mqtt.tls.ca_file: cannot load {ca_file}: {exc}") from None
    if cert_file is not None:
        try:
            ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"mqtt.tls.cert_file: cannot load {cert_file}: {exc}") from None
    if insecure:
        ctx.check_hostname = False
    return ctx
