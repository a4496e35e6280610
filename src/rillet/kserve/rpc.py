"""The service's method table, for a server (``add_GRPCInferenceServiceServicer_to_server``,
the name Ray Serve's gRPC proxy and grpc_tools' code use) and a client (``Stub``).

Only the path travels on the wire (``/inference.GRPCInferenceService/<Rpc>``); what is not
listed here answers UNIMPLEMENTED, as Triton's optional RPCs may.
"""

from __future__ import annotations

from typing import Any

import grpc

from rillet.kserve import grpc_service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"

#: name -> (streaming requests, streaming responses, request class, response class)
METHODS: dict[str, tuple[bool, bool, Any, Any]] = {
    "ServerLive": (False, False, pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (False, False, pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (False, False, pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (False, False, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (False, False, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelConfig": (False, False, pb.ModelConfigRequest, pb.ModelConfigResponse),
    "ModelInfer": (False, False, pb.ModelInferRequest, pb.ModelInferResponse),
    "ModelStreamInfer": (True, True, pb.ModelInferRequest, pb.ModelStreamInferResponse),
}

_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_GRPCInferenceServiceServicer_to_server(servicer: Any, server: Any) -> None:
    """Serve ``servicer``'s methods (named as the RPCs) on ``server``."""
    handlers = {
        name: _HANDLERS[(streams_in, streams_out)](
            getattr(servicer, name),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
        for name, (streams_in, streams_out, request, response) in METHODS.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class Stub:
    """Callables for each RPC on ``channel`` (``grpc.Channel`` or ``grpc.aio.Channel``)."""

    ServerLive: Any
    ServerReady: Any
    ModelReady: Any
    ServerMetadata: Any
    ModelMetadata: Any
    ModelConfig: Any
    ModelInfer: Any
    ModelStreamInfer: Any

    def __init__(self, channel: Any) -> None:
        kinds = {
            (False, False): channel.unary_unary,
            (False, True): channel.unary_stream,
            (True, False): channel.stream_unary,
            (True, True): channel.stream_stream,
        }
        for name, (streams_in, streams_out, request, response) in METHODS.items():
            call = kinds[(streams_in, streams_out)](
                f"/{SERVICE}/{name}",
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )
            setattr(self, name, call)
