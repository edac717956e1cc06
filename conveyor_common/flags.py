"""Flags every service has: where it listens, its metrics port, how long it
lets in-flight streams finish on SIGTERM, and how callers are let in (TLS,
client certificates, tokens; see conveyor_common/security.py)."""

from __future__ import annotations

import argparse

from conveyor_common import tracing
from conveyor_common.defaults import DEFAULT_HOST


def add_server_flags(parser: argparse.ArgumentParser, port: int, metrics_port: int) -> None:
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="interface to listen on, metrics included (0.0.0.0: every interface; give "
        "TLS and an authentication flag when it is not loopback)",
    )
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--metrics-port", type=int, default=metrics_port, help="0 disables")
    parser.add_argument(
        "--grace", type=float, default=5.0, help="seconds to finish streams on SIGTERM"
    )
    parser.add_argument(
        "--otlp-endpoint",
        default=tracing.default_endpoint(),
        help="send OpenTelemetry traces over OTLP/gRPC here, e.g. http://otel-collector:4317 "
        f"(default: ${tracing.OTLP_ENV}; empty: tracing off)",
    )
    tls = parser.add_argument_group("security")
    tls.add_argument("--tls-cert", default="", help="PEM certificate chain: serve TLS")
    tls.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    tls.add_argument(
        "--tls-ca",
        default="",
        help="PEM CA: callers must present a certificate it signed (mutual TLS)",
    )
    tls.add_argument(
        "--tls-allowed-names",
        default="",
        help="comma-separated names (certificate DNS SAN or CN) admitted by mutual TLS; "
        "empty: any certificate the CA signed",
    )
    tls.add_argument(
        "--auth-token-file",
        default="",
        help="file of accepted bearer tokens, one per line, re-read on change; calls must "
        "send `authorization: Bearer <token>`",
    )
    tls.add_argument(
        "--health-port",
        type=int,
        default=0,
        help="also serve grpc.health.v1 alone, in plaintext, on this port (for probes "
        "that speak neither TLS nor tokens); 0: off",
    )
