"""examples/ray/serve.yaml is a valid Serve config whose application builds (no cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from rillet.deploy.ray import RayAppArgs, app

EXAMPLE = Path(__file__).parents[2] / "examples" / "ray" / "serve.yaml"


def deployment_of(args: RayAppArgs) -> object:
    return app(args)._bound_deployment  # type: ignore[attr-defined]


def test_the_example_config_is_valid_and_builds() -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load(EXAMPLE.read_text()))
    assert config.grpc_options is not None and config.grpc_options.grpc_servicer_functions == [
        "rillet.kserve.rpc.add_GRPCInferenceServiceServicer_to_server"
    ]
    (application,) = config.applications
    assert application.import_path == "rillet.deploy.ray:app"
    # As `serve run` builds it: the config's args as a dict.
    built = call_user_app_builder_with_args_if_necessary(app, application.args)
    deployment = built._bound_deployment  # type: ignore[attr-defined]
    assert deployment.name == application.deployments[0].name == "rillet"


def test_ongoing_requests_default_to_the_engines_stream_capacity() -> None:
    deployment = deployment_of(RayAppArgs(max_concurrent_requests=48, num_replicas=3))
    assert deployment.max_ongoing_requests == 48 and deployment.num_replicas == 3
    assert deployment.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_autoscaling_on_ongoing_requests() -> None:
    deployment = deployment_of(
        RayAppArgs(min_replicas=1, max_replicas=4, target_ongoing_requests=24, threads=2)
    )
    autoscaling = deployment._deployment_config.autoscaling_config
    assert isinstance(autoscaling, AutoscalingConfig)
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 4)
    assert autoscaling.target_ongoing_requests == 24
    assert deployment.ray_actor_options["num_cpus"] == 2.0


def test_unknown_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="max_concurent_requests"):
        RayAppArgs.model_validate({"max_concurent_requests": 3})


def test_every_rillet_serve_option_is_an_argument_by_its_name() -> None:
    import argparse

    from rillet.server.serve_cmd import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    serve = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = {action.dest for action in serve.choices["serve"]._actions} - {"help"}
    # Serve's proxies listen, and Serve's graceful_shutdown_timeout_s drains a replica.
    not_on_ray = {"host", "port", "expose", "grpc_port", "log_level", "shutdown_grace"}
    assert options - not_on_ray <= set(RayAppArgs.model_fields), options - not_on_ray
