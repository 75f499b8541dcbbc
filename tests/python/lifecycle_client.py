#!/usr/bin/env python3
"""A sandboxd client built only from stubs that grpc_tools.protoc generated from proto/.

Usage: lifecycle_client.py ENDPOINT IMAGE

ENDPOINT is host:port (an http:// prefix is accepted and dropped); IMAGE is a reference the
server can pull. Needs PYTHONPATH to hold the generated `sandboxd/v1/*_pb2*.py` stubs.

Creates a sandbox, gets it, lists it by label, deletes it and checks it is gone, and checks gRPC
health overall and for the SandboxService. Prints "ok" and exits 0 when every check passes;
otherwise prints what failed to stderr and exits 1.
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sandboxd.v1 import sandbox_service_pb2 as pb
from sandboxd.v1 import sandbox_service_pb2_grpc as pb_grpc

SANDBOX_ID = "py-client"
LABEL_KEY = "client"
LABEL_VALUE = "python"
# Create may pull the image first.
CREATE_TIMEOUT_S = 120
CALL_TIMEOUT_S = 30


def fail(message):
    print(f"lifecycle_client: {message}", file=sys.stderr)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


def check_health(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "sandboxd.v1.SandboxService"):
        response = health.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S
        )
        check(
            response.status == health_pb2.HealthCheckResponse.SERVING,
            f"health of {service!r} is "
            f"{health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}, not SERVING",
        )


def run_lifecycle(channel, image):
    stub = pb_grpc.SandboxServiceStub(channel)

    created = stub.CreateSandbox(
        pb.CreateSandboxRequest(
            sandbox_id=SANDBOX_ID, image=image, labels={LABEL_KEY: LABEL_VALUE}
        ),
        timeout=CREATE_TIMEOUT_S,
    ).sandbox
    check(created.sandbox_id == SANDBOX_ID, f"created sandbox_id is {created.sandbox_id!r}")

    got = stub.GetSandbox(
        pb.GetSandboxRequest(sandbox_id=SANDBOX_ID), timeout=CALL_TIMEOUT_S
    ).sandbox
    check(
        got.state == pb.SANDBOX_STATE_RUNNING,
        f"GetSandbox state is {pb.SandboxState.Name(got.state)}, not SANDBOX_STATE_RUNNING",
    )
    check(
        dict(got.labels).get(LABEL_KEY) == LABEL_VALUE,
        f"GetSandbox labels are {dict(got.labels)}",
    )

    listed = stub.ListSandboxes(
        pb.ListSandboxesRequest(label_selector=f"{LABEL_KEY}={LABEL_VALUE}"),
        timeout=CALL_TIMEOUT_S,
    )
    ids = [s.sandbox_id for s in listed.sandboxes]
    check(SANDBOX_ID in ids, f"ListSandboxes({LABEL_KEY}={LABEL_VALUE}) returned {ids}")
    other = stub.ListSandboxes(
        pb.ListSandboxesRequest(label_selector=f"{LABEL_KEY}=not-{LABEL_VALUE}"),
        timeout=CALL_TIMEOUT_S,
    )
    other_ids = [s.sandbox_id for s in other.sandboxes]
    check(SANDBOX_ID not in other_ids, f"a non-matching selector still lists {other_ids}")

    stub.DeleteSandbox(
        pb.DeleteSandboxRequest(sandbox_id=SANDBOX_ID, force=True), timeout=CALL_TIMEOUT_S
    )

    try:
        gone = stub.GetSandbox(
            pb.GetSandboxRequest(sandbox_id=SANDBOX_ID), timeout=CALL_TIMEOUT_S
        )
    except grpc.RpcError as err:
        check(
            err.code() == grpc.StatusCode.NOT_FOUND,
            f"GetSandbox after delete failed with {err.code()} ({err.details()}), not NOT_FOUND",
        )
    else:
        fail(f"GetSandbox after delete still returned {gone.sandbox}")


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    endpoint, image = argv[1], argv[2]
    for prefix in ("http://", "dns:///"):
        if endpoint.startswith(prefix):
            endpoint = endpoint[len(prefix):]
    with grpc.insecure_channel(endpoint) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT_S)
            check_health(channel)
            run_lifecycle(channel, image)
            check_health(channel)
        except grpc.RpcError as err:
            fail(f"unexpected RPC error: {err.code()}: {err.details()}")
        except grpc.FutureTimeoutError:
            fail(f"cannot connect to {endpoint} within {CALL_TIMEOUT_S}s")
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
