"""The gRPC door of ``rillet serve``: Triton's ``GRPCInferenceService`` on grpc.aio (port 8001)."""

from __future__ import annotations

import grpc

from rillet.kserve.rpc import add_GRPCInferenceServiceServicer_to_server
from rillet.server.kserve.handler import KServeHandler
from rillet.server.kserve.servicer import KServeServicer, abort
from rillet.server.service import GenerationService

#: Above gRPC's 4 MiB default: tritonclient itself allows messages up to 2 GiB.
MAX_MESSAGE_BYTES = 64 << 20


async def start_grpc_server(
    service: GenerationService, host: str, port: int
) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC door on ``host:port`` (0: any free port); ``(server, bound port)``.

    ``SO_REUSEPORT`` is off: a second server on the same port fails here, loudly, instead
    of silently sharing the port's connections with the first.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    # grpc.aio's context.abort ends a failed call at once, with the error table's code.
    servicer = KServeServicer(KServeHandler(service), abort)
    add_GRPCInferenceServiceServicer_to_server(servicer, server)
    bracketed = f"[{host}]" if ":" in host else host
    bound = server.add_insecure_port(f"{bracketed}:{port}")
    await server.start()
    return server, bound
