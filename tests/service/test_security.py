"""Bearer tokens, TLS and mutual TLS against real servers, with certificates made here."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lineinspect.errors import LineInspectError
from lineinspect.service.commands.serve import config_from_args, register
from lineinspect.service.config import ServerConfig
from lineinspect.service.server import start_server
from lineinspect.v1 import inspection_pb2 as pb

Code = grpc.StatusCode
TOKEN = "s3cret-token-for-line-7"


# ------------------------------------------------------------------------------ certificates


@dataclass
class Pem:
    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer: Pem | None, *, ca: bool = False, server: bool = False) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    if issuer is None:
        issuer_name, issuer_key = _name(subject), key
    else:
        issuer_cert = x509.load_pem_x509_certificate(issuer.cert)
        issuer_name = issuer_cert.subject
        issuer_key = serialization.load_pem_private_key(issuer.key, None)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    return Pem(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
    )


@dataclass
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    other_client: Pem  # signed by a CA the server does not trust
    dir: Path

    def write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = _issue("lineinspect test CA", None, ca=True)
    rogue_ca = _issue("someone else's CA", None, ca=True)
    return Pki(
        ca=ca,
        server=_issue("localhost", ca, server=True),
        client=_issue("camera-gateway-1", ca),
        other_client=_issue("intruder", rogue_ca),
        dir=tmp_path_factory.mktemp("pki"),
    )


def _inspect(stub, media) -> pb.InspectResponse:
    return stub.Inspect(pb.InspectRequest(image=media.image()), timeout=10)


# ------------------------------------------------------------------------------ tokens


@pytest.fixture(scope="module")
def token_server(server_factory, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("auth") / "tokens.txt"
    path.write_text(f"# accepted tokens\n\nold-token-being-rotated-out\n{TOKEN}\n")
    return server_factory(auth_token_file=path)


def test_token_missing_or_wrong_is_unauthenticated(token_server, connect, media) -> None:
    stub = connect.stub(token_server.port)
    for metadata, why in (
        ((), "missing"),
        ((("authorization", "Bearer nope"),), "invalid bearer token"),
        ((("authorization", TOKEN),), "Bearer <token>"),  # no scheme
        ((("authorization", f"Basic {TOKEN}"),), "Bearer <token>"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.Inspect(pb.InspectRequest(image=media.image()), metadata=metadata, timeout=10)
        assert err.value.code() == Code.UNAUTHENTICATED and why in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # streams too, before any frame is looked at
        list(stub.InspectStream(iter([pb.Frame(camera_id="c", image=media.image())]), timeout=10))
    assert err.value.code() == Code.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert err.value.code() == Code.UNAUTHENTICATED


def test_right_token_is_accepted_on_every_kind_of_call(token_server, connect, media) -> None:
    stub = connect.stub(token_server.port)
    for token in (TOKEN, "old-token-being-rotated-out"):
        metadata = (("authorization", f"Bearer {token}"),)
        reply = stub.Inspect(pb.InspectRequest(image=media.image()), metadata=metadata, timeout=10)
        assert reply.verdict.image_width == 64
    metadata = (("authorization", f"bearer {TOKEN}"),)  # the scheme is case-insensitive
    frames = [pb.Frame(camera_id="c", frame_id=i, image=media.image()) for i in range(3)]
    assert len(list(stub.InspectStream(iter(frames), metadata=metadata, timeout=10))) == 3
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=10).preset == "tiny"


def test_health_checks_stay_open_with_tokens(token_server, connect) -> None:
    health = health_pb2_grpc.HealthStub(connect.channel(token_server.port))
    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------------------ TLS


def test_tls_serves_trusting_clients_and_refuses_plaintext(server_factory, connect, pki: Pki, media) -> None:
    running = server_factory(tls_cert=pki.write("server.pem", pki.server.cert),
                             tls_key=pki.write("server.key", pki.server.key))
    secure = connect.stub(running.port, grpc.ssl_channel_credentials(root_certificates=pki.ca.cert))
    assert _inspect(secure, media).verdict.image_width == 64
    plain = connect.stub(running.port)
    with pytest.raises(grpc.RpcError) as err:
        _inspect(plain, media)
    assert err.value.code() == Code.UNAVAILABLE
    untrusting = connect.stub(running.port, grpc.ssl_channel_credentials(root_certificates=pki.client.cert))
    with pytest.raises(grpc.RpcError) as err:
        _inspect(untrusting, media)
    assert err.value.code() == Code.UNAVAILABLE


def test_mutual_tls_rejects_clients_without_a_trusted_cert(server_factory, connect, pki: Pki, media) -> None:
    running = server_factory(tls_cert=pki.write("server.pem", pki.server.cert),
                             tls_key=pki.write("server.key", pki.server.key),
                             tls_client_ca=pki.write("ca.pem", pki.ca.cert))
    with_cert = grpc.ssl_channel_credentials(pki.ca.cert, pki.client.key, pki.client.cert)
    assert _inspect(connect.stub(running.port, with_cert), media).verdict.image_width == 64
    for credentials in (
        grpc.ssl_channel_credentials(pki.ca.cert),  # no client certificate
        grpc.ssl_channel_credentials(pki.ca.cert, pki.other_client.key, pki.other_client.cert),  # untrusted
    ):
        with pytest.raises(grpc.RpcError) as err:
            _inspect(connect.stub(running.port, credentials), media)
        assert err.value.code() == Code.UNAVAILABLE


# ------------------------------------------------------------------------------ user errors


def test_unusable_security_files_are_user_errors(aio_loop, tiny_inspector, pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    not_pem = pki.write("garbage.pem", b"hello")
    empty = pki.write("empty.txt", b"\n# only a comment\n")
    cases = [
        (ServerConfig(port=0, tls_cert=missing, tls_key=missing), "cannot read"),
        (ServerConfig(port=0, tls_cert=not_pem, tls_key=not_pem), "not a PEM certificate"),
        (ServerConfig(port=0, auth_token_file=empty), "no token"),
    ]
    for config, words in cases:
        with pytest.raises(LineInspectError, match=words):
            aio_loop.run(start_server(config, tiny_inspector, warmup=False))
    with pytest.raises(LineInspectError, match="both a certificate and a key"):
        ServerConfig(tls_cert=missing)
    with pytest.raises(LineInspectError, match="needs --tls-cert"):
        ServerConfig(tls_client_ca=missing)


def test_cli_flags_become_a_config_or_a_clear_error(pki: Pki, tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    cert, key = pki.write("server.pem", pki.server.cert), pki.write("server.key", pki.server.key)
    args = parser.parse_args(["serve", "--port", "0", "--max-batch", "32", "--tls-cert", str(cert),
                              "--tls-key", str(key), "--max-message-mb", "8"])
    config = config_from_args(args)
    assert (config.port, config.max_batch, config.tls, config.max_message_bytes) == (0, 32, True, 8 << 20)
    args = parser.parse_args(["serve", "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(key)])
    with pytest.raises(LineInspectError, match="missing.pem: file not found"):
        config_from_args(args)
    with pytest.raises(LineInspectError, match="min_batch"):
        config_from_args(parser.parse_args(["serve", "--min-batch", "8", "--max-batch", "4"]))
    with pytest.raises(LineInspectError, match="70000 is not a TCP port"):
        config_from_args(parser.parse_args(["serve", "--port", "70000"]))


def test_port_in_use_is_a_user_error(server, aio_loop, tiny_inspector) -> None:
    with pytest.raises(LineInspectError, match="in use"):
        aio_loop.run(start_server(ServerConfig(port=server.port), tiny_inspector, warmup=False))
