"""KServe v2 / Triton on the server: everything the Triton doors share, in one place.

* ``dialect.py``: a decoded request (tensors as Python values) -> a plan; the model's inputs
  and outputs, with vLLM-backend names. No transport.
* ``render.py``: a plan's outputs for each response (a streamed delta, or a whole answer).
* ``handler.py``: the RPCs on protobuf messages, on the generation service (no gRPC context).
* ``servicer.py``: the one servicer over the handler, for grpc.aio and Ray Serve's gRPC proxy.
* ``grpc_server.py``: the gRPC door of ``rillet serve`` (grpc.aio, port 8001).

The wire protocol itself (``.proto``, its messages, the RPC table, tensor bytes) is
:mod:`rillet.kserve`, below this package, which the client imports too. Triton's HTTP routes
are with the other HTTP routes (``rillet.server.http.triton``) and use this package's dialect.

The dialect's and the renderer's names are here, for the doors: ``kserve.plan(request)``,
``kserve.KServeRenderer(plan)``. The gRPC modules are not imported here: an HTTP-only
process never loads grpc.
"""

from rillet.server.kserve.dialect import (
    DEFAULT_MAX_TOKENS,
    INPUTS,
    OUTPUTS,
    KServePlan,
    KServeRequest,
    check_model,
    model_names,
    plan,
)
from rillet.server.kserve.render import KServeRenderer, Output

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "INPUTS",
    "OUTPUTS",
    "KServePlan",
    "KServeRenderer",
    "KServeRequest",
    "Output",
    "check_model",
    "model_names",
    "plan",
]
