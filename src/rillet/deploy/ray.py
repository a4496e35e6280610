"""rillet on Ray Serve: the very app of ``rillet serve``, as N replicas behind Serve's proxies.

    serve run rillet.deploy.ray:app num_replicas=2 threads=1
    serve run examples/ray/serve.yaml            # with Serve's gRPC proxy for tritonclient
    RAY_SERVE_ENABLE_HA_PROXY=1 serve run rillet.deploy.ray:app   # HAProxy as the ingress

Each replica owns one engine (in a process of its own, as ``rillet serve`` runs it) and one
generation service, and serves every HTTP door through Serve's HTTP proxy (TGI, OpenAI,
plain text, the WebSocket chat and ``/ws``, the page, Triton HTTP), with an
``x-rillet-replica`` header naming it. With Serve's HAProxy ingress (a cluster setting:
``RAY_SERVE_ENABLE_HA_PROXY=1`` where the cluster starts) each replica serves HTTP itself
and HAProxy forwards connections to it, so no Python proxy relays a stream's events: the
setting for streaming (``bench/RESULTS.md``). Through Serve's gRPC proxy (``grpc_options`` with
``rillet.kserve.rpc.add_GRPCInferenceServiceServicer_to_server``) it serves Triton's
``GRPCInferenceService``, so stock tritonclient streams through Ray: the replica is the
servicer of ``rillet serve``'s gRPC door (``rillet.server.kserve.servicer``).

Backpressure keeps its meaning: ``max_ongoing_requests`` per replica is the engine's stream
capacity (``max_concurrent_requests``, not Serve's default of 5; a stream holds its slot
until it ends), and past ``max_queued_requests`` waiting in a proxy Serve refuses at once:
429 with ``retry-after`` over HTTP (Serve's text body), ``RESOURCE_EXHAUSTED`` over gRPC.
Serve's health check asks the engine.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, create_model
from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from rillet.server.kserve.handler import KServeHandler
from rillet.server.kserve.servicer import KServeServicer, set_status
from rillet.server.serve_options import SERVE_OPTIONS, configs_of
from rillet.server.service import GenerationService

log = logging.getLogger("rillet.deploy")


class ServeKnobs(BaseModel):
    """Serve's own knobs among the builder's arguments: replicas, autoscaling, resources,
    backpressure. :class:`RayAppArgs` adds ``rillet serve``'s options."""

    model_config = ConfigDict(extra="forbid")

    #: Replicas (Serve's default is 1; a config file's ``deployments`` may set it instead).
    num_replicas: int | None = None
    #: When set, replicas scale between min and max on ongoing requests per replica.
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    #: Per replica; default: the engine's capacity, ``max_concurrent_requests``.
    max_ongoing_requests: int | None = None
    #: Requests Serve queues for the deployment before refusing with 429 (-1: no limit).
    max_queued_requests: int = 64
    retry_after_s: float = 1.0
    num_cpus: float | None = None
    num_gpus: float = 0.0


def _option_fields() -> dict[str, Any]:
    """``rillet serve``'s options that a replica takes, as pydantic fields: the option's type
    (optional where its default is None) and default. Choices are left to the configs to
    check (``EngineConfig`` refuses an unknown ``kv_cache_dtype``)."""
    fields: dict[str, Any] = {}
    for option in SERVE_OPTIONS:
        if option.on_ray:
            kind = option.type if option.default is not None else option.type | None
            fields[option.name] = (kind, option.default)
    return fields


if TYPE_CHECKING:

    class RayAppArgs(ServeKnobs):
        # create_model's fields are made at run time, unseen by type checkers: let any
        # argument in and type every attribute Any.
        def __init__(self, **arguments: Any) -> None: ...
        def __getattr__(self, name: str) -> Any: ...

else:
    RayAppArgs = create_model(
        "RayAppArgs",
        __base__=ServeKnobs,
        __module__=__name__,
        __doc__=(
            "The builder's arguments (``serve run rillet.deploy.ray:app key=value ...`` or a "
            "config file's ``args``): Serve's own knobs (:class:`ServeKnobs`), then ``rillet "
            "serve``'s options by their names, as ``rillet.server.serve_options`` declares "
            "them. An unknown name is refused."
        ),
        **_option_fields(),
    )


@serve.ingress()
class RilletReplica(KServeServicer):
    """One replica: an engine, its generation service, the HTTP app, and Triton's gRPC
    methods, which Serve's gRPC proxy calls on the replica by the RPCs' names: the replica
    is the KServe servicer, with Serve's way of failing a call (:func:`set_status`)."""

    def __init__(self, args: dict[str, Any]) -> None:
        from rillet.engine.async_engine import AsyncEngine

        options = RayAppArgs.model_validate(args)
        # Serve's gRPC proxy is the gRPC door here, and Serve's HTTP proxy listens.
        engine_config, config = configs_of(options.model_dump(), grpc_port=0)
        engine = AsyncEngine.from_config(engine_config, own_process=not options.engine_in_process)
        self.service = GenerationService(engine, config)
        KServeServicer.__init__(self, KServeHandler(self.service), set_status)
        self.name = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self) -> Any:
        from rillet.server.http.app import create_service_app

        return create_service_app(self.service, instance=self.name)

    async def check_health(self) -> None:
        """Serve's health check: a replica whose engine has died is replaced."""
        if not self.service.engine.is_healthy:
            raise RuntimeError("the engine has stopped")


def app(args: RayAppArgs | dict[str, Any]) -> Application:
    """The application builder: ``serve run rillet.deploy.ray:app [key=value ...]``, or a
    config file's ``import_path`` with its ``args`` (Serve passes them as a dict)."""
    args = RayAppArgs.model_validate(args)
    options: dict[str, Any] = {
        "max_ongoing_requests": args.max_ongoing_requests or args.max_concurrent_requests,
        "max_queued_requests": args.max_queued_requests,
        "backpressure_config": BackpressureConfig(
            status_code=429, retry_after_s=args.retry_after_s
        ),
        "ray_actor_options": {
            "num_cpus": args.num_cpus if args.num_cpus is not None else float(args.threads or 1),
            "num_gpus": args.num_gpus,
        },
        # Loading a model takes seconds; Serve's default 30 s health-check timeout is ample.
        "health_check_period_s": 10,
    }
    if args.min_replicas is not None or args.max_replicas is not None:
        least = args.min_replicas if args.min_replicas is not None else 1
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=least,
            max_replicas=args.max_replicas if args.max_replicas is not None else max(least, 1),
            target_ongoing_requests=args.target_ongoing_requests
            or 0.5 * args.max_concurrent_requests,
        )
    elif args.num_replicas is not None:
        options["num_replicas"] = args.num_replicas
    deployment = serve.deployment(name="rillet")(RilletReplica).options(**options)
    return deployment.bind(args.model_dump())
