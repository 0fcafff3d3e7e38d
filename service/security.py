"""Transport security and authentication, both optional.

* TLS: `--tls-cert` + `--tls-key` (PEM). Adding `--tls-client-ca` makes it mutual TLS: the
  handshake fails for a client without a certificate signed by that CA.
* Bearer tokens: `--auth-token-file` holds one or more tokens, one per line (blank lines and
  `#` comments ignored; several lines allow rotation). Every call must carry the metadata
  `authorization: Bearer <token>`, else it fails with UNAUTHENTICATED.
  Health checks (`grpc.health.v1.Health`) stay open: load balancers and orchestrators probe
  without credentials, and health reveals nothing but SERVING / NOT_SERVING. Reflection is
  *not* open: it describes the API to whoever asks.
  Tokens travel in clear text without TLS; use both together outside a trusted network.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc

from lineinspect.errors import LineInspectError
from lineinspect.service.config import ServerConfig

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def _read(path: Path, what: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LineInspectError(f"{flag} {path}: cannot read the {what} ({exc.strerror or exc})") from exc
    if not data.strip():
        raise LineInspectError(f"{flag} {path}: the {what} file is empty")
    return data


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS) credentials from the config's PEM files; None when TLS is off."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    cert = _read(config.tls_cert, "TLS certificate", "--tls-cert")
    key = _read(config.tls_key, "TLS private key", "--tls-key")
    if b"-----BEGIN" not in cert or b"CERTIFICATE" not in cert:
        raise LineInspectError(f"--tls-cert {config.tls_cert}: not a PEM certificate")
    if b"PRIVATE KEY" not in key:
        raise LineInspectError(f"--tls-key {config.tls_key}: not a PEM private key")
    client_ca = None
    if config.tls_client_ca is not None:
        client_ca = _read(config.tls_client_ca, "client CA certificate", "--tls-client-ca")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def read_tokens(path: Path) -> tuple[bytes, ...]:
    """The accepted tokens of a token file (one per line)."""
    lines = _read(path, "auth token", "--auth-token-file").decode("utf-8", "replace").splitlines()
    tokens = tuple(t.strip().encode() for t in lines if t.strip() and not t.strip().startswith("#"))
    if not tokens:
        raise LineInspectError(f"--auth-token-file {path}: no token found (only comments or blank lines)")
    return tokens


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid `authorization: Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, tokens: tuple[bytes, ...], on_reject: Callable[[str], None] | None = None) -> None:
        if not tokens:
            raise ValueError("BearerTokenInterceptor needs at least one token")
        self._tokens = tokens
        self._on_reject = on_reject

    def _valid(self, metadata: tuple | None) -> tuple[bool, str]:
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return False, "missing 'authorization: Bearer <token>' metadata"
        value = values[0].encode() if isinstance(values[0], str) else values[0]
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return False, "authorization metadata must be 'Bearer <token>'"
        token = token.strip()
        # Compare against every token without an early exit, in constant time per token.
        ok = False
        for candidate in self._tokens:
            ok |= hmac.compare_digest(token, candidate)
        return ok, "" if ok else "invalid bearer token"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        ok, reason = self._valid(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if ok or handler is None:
            return handler
        log.warning("unauthenticated call refused", extra={"method": method, "detail": reason})
        if self._on_reject is not None:
            self._on_reject(method)
        return _deny_like(handler, reason)


def _deny_like(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that fails with UNAUTHENTICATED."""
    code = grpc.StatusCode.UNAUTHENTICATED

    async def unary(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, reason)

    async def streaming(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await context.abort(code, reason)
        yield  # never reached; makes this an async generator, as streaming handlers are

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
