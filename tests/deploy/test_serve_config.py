"""examples/ray/serve.yaml is a valid Serve config whose application builds (no cluster)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from rillet.cli import build_parser
from rillet.deploy.ray import RayAppArgs, RilletReplica, ServeKnobs, app
from rillet.kserve.rpc import METHODS
from rillet.server.serve_options import SERVE_OPTIONS, configs_of

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


def test_the_replica_has_every_rpc_as_serves_grpc_proxy_calls_it() -> None:
    # The proxy calls a replica's method by the RPC's name, hands it the context only if it
    # has a parameter named grpc_context, and streams what an async generator yields.
    for name in METHODS:
        assert "grpc_context" in inspect.signature(getattr(RilletReplica, name)).parameters
    assert inspect.isasyncgenfunction(RilletReplica.ModelStreamInfer)


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


def test_the_arguments_are_serves_knobs_then_each_option_a_replica_takes() -> None:
    on_ray = [option.name for option in SERVE_OPTIONS if option.on_ray]
    assert list(RayAppArgs.model_fields) == [*ServeKnobs.model_fields, *on_ray]
    # Where to listen and how to log are Serve's and Ray's; their own names are refused.
    assert {"host", "port", "grpc_port", "shutdown_grace", "log_level"}.isdisjoint(on_ray)
    with pytest.raises(ValueError, match="port"):
        RayAppArgs.model_validate({"port": 9000})
    # The defaults are the command line's.
    defaults = RayAppArgs()
    cli = vars(build_parser().parse_args(["serve"]))
    assert {name: getattr(defaults, name) for name in on_ray} == {
        name: cli[name] for name in on_ray
    }


def test_the_ray_builder_and_the_command_line_give_the_same_configs() -> None:
    """Every option a replica takes, as ``serve run ... key=value`` passes it (a string)."""
    argv, args = ["serve"], {}
    for option in SERVE_OPTIONS:
        if option.on_ray and option.type is bool:
            argv.append(option.flag)
            args[option.name] = "true"
        elif option.on_ray:
            value = {int: "3", float: "0.75", str: "text"}[option.type]
            if option.choices:  # the last choice, never the default
                value = option.choices[-1]
            # Options whose values are checked past their type: a valid one, not the default.
            valid = {"dtype": "float16", "kv_cache_dtype": "int8", "speculative": "ngram"}
            value = valid.get(option.name, value)
            argv += [option.flag, value]
            args[option.name] = value
    cli = vars(build_parser().parse_args(argv))
    ray = RayAppArgs.model_validate(args).model_dump()
    assert configs_of(ray) == configs_of(cli)
    assert configs_of(ray)[0].num_threads == 3 and ray["engine_in_process"] is True


def test_a_wrongly_typed_argument_is_refused() -> None:
    with pytest.raises(ValueError, match="threads"):
        RayAppArgs.model_validate({"threads": "two"})
    assert RayAppArgs.model_validate({"kv_cache_memory": "0.5"}).kv_cache_memory == 0.5
