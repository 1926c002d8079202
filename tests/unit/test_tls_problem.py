"""A broker certificate that fails verification is a configuration problem
naming the key to change, told apart from an unreachable broker."""

from __future__ import annotations

import ssl
from pathlib import Path

from aiomqtt import MqttError

from ingestd.mqtt.connect import tls_problem


def _as_aiomqtt_raises(exc: BaseException) -> MqttError:
    # aiomqtt: `except OSError as exc: raise MqttError(str(exc)) from None`
    try:
        try:
            raise exc
        except OSError as inner:
            raise MqttError(str(inner)) from None
    except MqttError as outer:
        return outer


def _verify_error(message: str) -> ssl.SSLCertVerificationError:
    err = ssl.SSLCertVerificationError(
        1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}"
    )
    err.verify_message = message
    return err


def test_an_untrusted_certificate_names_ca_file() -> None:
    error = _as_aiomqtt_raises(_verify_error("unable to get local issuer certificate"))
    problem = tls_problem(error, Path("/etc/ingestd/ca.crt"))
    assert problem is not None
    assert "mqtt.tls.ca_file" in problem
    assert "unable to get local issuer certificate" in problem
    assert "/etc/ingestd/ca.crt" in problem
    assert "system's CA" in str(tls_problem(error, None))


def test_a_name_mismatch_names_host_and_insecure() -> None:
    error = _as_aiomqtt_raises(_verify_error("Hostname mismatch, certificate is not valid"))
    problem = tls_problem(error, None)
    assert problem is not None
    assert "mqtt.host" in problem
    assert "mqtt.tls.insecure" in problem


def test_the_text_alone_is_enough() -> None:
    error = MqttError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: expired")
    assert "mqtt.tls.ca_file" in str(tls_problem(error, None))


def test_other_failures_are_not_tls_problems() -> None:
    assert tls_problem(_as_aiomqtt_raises(ConnectionRefusedError(111, "refused")), None) is None
    assert tls_problem(MqttError("[Errno 111] Connection refused"), None) is None
