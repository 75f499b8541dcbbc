#!/usr/bin/env python3
"""Python grpcio against a sandboxd that serves TLS and authenticates callers.

Usage: auth_client.py HOST:PORT CA_PEM TOKEN CLIENT_CERT CLIENT_KEY

Makes each call the README's Python example makes, with and without credentials, and prints
one JSON object with what each answered (a status name, or the error's code), for the Rust
test to judge:

  health:       Health/Check("") over TLS with no credentials at all
  no_token:     ListSandboxes over TLS with no credentials
  wrong_token:  ListSandboxes with a token the server does not know
  token:        ListSandboxes with ssl_channel_credentials + access_token_call_credentials
  client_cert:  ListSandboxes with a client certificate (its CN is the tenant), no token

A ListSandboxesRequest with no fields set is the empty message, so no stubs are needed.
"""

import json
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

CALL_TIMEOUT_S = 30
LIST = "/sandboxd.v1.SandboxService/ListSandboxes"


def outcome(call):
    try:
        call()
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


def main():
    target, ca_path, token, cert_path, key_path = sys.argv[1:6]
    with open(ca_path, "rb") as f:
        ca = f.read()
    with open(cert_path, "rb") as f:
        cert = f.read()
    with open(key_path, "rb") as f:
        key = f.read()
    tls = grpc.ssl_channel_credentials(root_certificates=ca)
    result = {}

    with grpc.secure_channel(target, tls) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
            result["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as e:
            result["health"] = e.code().name
        result["no_token"] = outcome(lambda: channel.unary_unary(LIST)(b"", timeout=CALL_TIMEOUT_S))

    for name, secret in (("wrong_token", "not-" + token), ("token", token)):
        credentials = grpc.composite_channel_credentials(
            tls, grpc.access_token_call_credentials(secret)
        )
        with grpc.secure_channel(target, credentials) as channel:
            result[name] = outcome(lambda: channel.unary_unary(LIST)(b"", timeout=CALL_TIMEOUT_S))

    mtls = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    with grpc.secure_channel(target, mtls) as channel:
        result["client_cert"] = outcome(
            lambda: channel.unary_unary(LIST)(b"", timeout=CALL_TIMEOUT_S)
        )

    print(json.dumps(result))


if __name__ == "__main__":
    main()
