"""The plaintext listener as the Kubernetes manifests use it (deploy/kubernetes, docs/
deployment.md): gRPC health answers there, and no keybroker RPC answers anything but a
refusal, whatever the request."""

from __future__ import annotations

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from keybroker.v1 import audit_pb2, crypto_pb2, key_admin_pb2, tokens_pb2

from tests.broker_fixtures import Broker

SERVICES = (
    key_admin_pb2.DESCRIPTOR.services_by_name["KeyAdmin"],
    crypto_pb2.DESCRIPTOR.services_by_name["Crypto"],
    tokens_pb2.DESCRIPTOR.services_by_name["Tokens"],
    audit_pb2.DESCRIPTOR.services_by_name["Audit"],
)


def test_health_answers_on_the_probe_listener(broker: Broker) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{broker.running.insecure_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "keybroker.v1.Crypto"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_every_keybroker_rpc_is_refused_on_the_probe_listener(broker: Broker) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{broker.running.insecure_port}") as channel:
        for service in SERVICES:
            for method in service.methods:
                codes = _codes(channel, service.full_name, method)
                assert codes == {grpc.StatusCode.UNAUTHENTICATED}, (method.name, codes)


def _codes(channel: grpc.Channel, service: str, method: object) -> set[grpc.StatusCode]:
    """The status of the RPC for an empty request, and for one with its fields filled."""
    request_cls = message_factory.GetMessageClass(method.input_type)  # type: ignore[attr-defined]
    response_cls = message_factory.GetMessageClass(method.output_type)  # type: ignore[attr-defined]
    path = f"/{service}/{method.name}"  # type: ignore[attr-defined]
    requests = [request_cls(), _filled(request_cls())]
    codes = set()
    for request in requests:
        if method.client_streaming:  # type: ignore[attr-defined]
            call = channel.stream_stream(
                path, request_cls.SerializeToString, response_cls.FromString
            )
            stream = call(iter([request]), timeout=10)
        elif method.server_streaming:  # type: ignore[attr-defined]
            call = channel.unary_stream(
                path, request_cls.SerializeToString, response_cls.FromString
            )
            stream = call(request, timeout=10)
        else:
            call = channel.unary_unary(path, request_cls.SerializeToString, response_cls.FromString)
            stream = None
        try:
            if stream is None:
                call(request, timeout=10)
            else:
                assert list(stream) == []
        except grpc.RpcError as exc:
            codes.add(exc.code())  # type: ignore[attr-defined]
        else:
            codes.add(grpc.StatusCode.OK)
    return codes


def _filled(request: object) -> object:
    """Plausible values in the request's string fields (a key id, a token id)."""
    for field in request.DESCRIPTOR.fields:  # type: ignore[attr-defined]
        if field.type == field.TYPE_STRING and not field.is_repeated:
            setattr(request, field.name, "probe-key")
    return request
