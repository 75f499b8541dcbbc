#!/usr/bin/env python3
"""Python grpcio on a unix socket, with grpcio's defaults: no grpc.default_authority option.

Usage: unix_client.py SOCKET

grpcio sends the socket's (percent-encoded) path as :authority. Makes three calls and prints one
JSON object with what each answered, for the Rust test to judge:

  health:  grpc.health.v1.Health/Check("") -> status name, or the error's code and details
  missing: GetSandbox of an id that does not exist -> code and details
  long_label: CreateSandbox with a 10,000-byte label key -> code and details

The sandboxd messages are encoded by hand (no generated stubs needed): a string field is
tag (field << 3 | 2), length, bytes; a map entry is a message of key = 1, value = 2.
"""

import json
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

CALL_TIMEOUT_S = 30
# CreateSandboxRequest: image = 2, labels = 9. GetSandboxRequest: sandbox_id = 1.
CREATE_IMAGE, CREATE_LABELS, GET_SANDBOX_ID = 2, 9, 1
LONG_KEY_BYTES = 10_000


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number, data):
    return varint(number << 3 | 2) + varint(len(data)) + data


def error(e):
    return {"code": e.code().name, "details": e.details()}


def main():
    channel = grpc.insecure_channel("unix:" + sys.argv[1])
    result = {}
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S
        )
        result["health"] = {"status": health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}
    except grpc.RpcError as e:
        result["health"] = error(e)

    def call(method, request):
        rpc = channel.unary_unary("/sandboxd.v1.SandboxService/" + method)
        try:
            rpc(request, timeout=CALL_TIMEOUT_S)
            return {"code": "OK", "details": ""}
        except grpc.RpcError as e:
            return error(e)

    result["missing"] = call("GetSandbox", field(GET_SANDBOX_ID, b"no-such-sandbox"))
    entry = field(1, b"k" * LONG_KEY_BYTES) + field(2, b"v")
    result["long_label"] = call(
        "CreateSandbox", field(CREATE_IMAGE, b"busybox") + field(CREATE_LABELS, entry)
    )
    channel.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
