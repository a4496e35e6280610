"""``rillet serve``'s options, declared once in SERVE_OPTIONS: the parser and the configs
built from that declaration (the Ray builder's arguments: tests/deploy/test_serve_config.py)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import pytest

from rillet.config import EngineConfig
from rillet.server.config import ServerConfig
from rillet.server.serve_options import SERVE_OPTIONS, Option, add_arguments, configs_of

GIB = 1 << 30

#: A value other than the default for each option, as typed on the command line (by type,
#: but where a config accepts only some values).
SAMPLES = {
    "dtype": "float16",
    "kv_cache_dtype": "int8",
    "kv_cache_memory": "1.5",
    "speculative": "ngram",
}


def parse(*argv: str) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return vars(parser.parse_args(argv))


def sample(option: Option) -> str:
    """A command-line value for ``option`` that differs from its default."""
    if option.name in SAMPLES:
        return SAMPLES[option.name]
    return {int: "3", float: "0.75", str: "text"}[option.type]


@pytest.fixture(autouse=True)
def _no_rillet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RILLET_MODEL", "RILLET_DTYPE", "RILLET_DEVICE", "RILLET_NATIVE_KERNELS"):
        monkeypatch.delenv(var, raising=False)


def test_each_option_is_declared_once_and_fills_config_fields_that_exist() -> None:
    names = [option.name for option in SERVE_OPTIONS]
    assert len(names) == len(set(names))
    engine = [option.engine for option in SERVE_OPTIONS if option.engine]
    server = [option.server for option in SERVE_OPTIONS if option.server]
    # No config field is filled by two options.
    assert len(engine) == len(set(engine)) and len(server) == len(set(server))
    assert set(engine) <= {field.name for field in dataclasses.fields(EngineConfig)}
    assert set(server) <= {field.name for field in dataclasses.fields(ServerConfig)}


def test_no_options_give_the_configs_own_defaults() -> None:
    engine, server = configs_of(parse())
    assert engine == EngineConfig() and server == ServerConfig()


def test_every_option_reaches_the_fields_it_names() -> None:
    filling = [option for option in SERVE_OPTIONS if option.engine or option.server]
    argv = [arg for option in filling for arg in (option.flag, sample(option))]
    engine, server = configs_of(parse(*argv))
    for option in filling:
        value = option.type(sample(option))
        if option.to_config is not None:
            value = option.to_config(value)
        assert value != option.default, option.name
        if option.engine:
            assert getattr(engine, option.engine) == value, option.name
        if option.server:
            assert getattr(server, option.server) == value, option.name


def test_options_named_unlike_their_fields_fill_them() -> None:
    engine, server = configs_of(
        parse(
            "--max-total-tokens", "900",
            "--max-batch-tokens", "64",
            "--kv-cache-memory", "1.5",
            "--threads", "2",
            "--resume-window", "0",
            "--shutdown-grace", "2.5",
        )
    )  # fmt: skip
    # One context length: the engine's, and what requests are checked against.
    assert engine.max_model_len == server.max_total_tokens == 900
    assert engine.max_num_batched_tokens == 64 and engine.num_threads == 2
    assert engine.kv_cache_memory_bytes == int(1.5 * GIB)
    assert server.resume_window_s == 0 and server.shutdown_grace_s == 2.5


def test_flags_are_off_unless_given_and_fill_no_config() -> None:
    flags = [option for option in SERVE_OPTIONS if option.type is bool]
    assert {option.name for option in flags} == {"expose", "engine_in_process"}
    assert not any(parse()[option.name] for option in flags)
    given = parse(*(option.flag for option in flags))
    assert all(given[option.name] for option in flags)
    assert configs_of(given) == configs_of(parse())


def test_the_caller_sets_where_to_listen_over_the_options() -> None:
    _, server = configs_of(parse("--host", "10.0.0.1", "--port", "9000"), host="0.0.0.0")
    assert (server.host, server.port) == ("0.0.0.0", 9000)


def test_names_that_are_no_option_are_passed_over_and_left_out_options_keep_defaults() -> None:
    engine, server = configs_of({"threads": 2, "num_replicas": 3})
    assert engine == EngineConfig(num_threads=2) and server == ServerConfig()


def test_a_server_options_default_is_its_config_fields() -> None:
    assert Option("port", int, server="port").default == ServerConfig.port == 8080
    with pytest.raises(ValueError, match=r"ServerConfig\.port"):
        Option("port", int, default=9000, server="port")


def test_the_keep_alive_interval_is_hidden_from_help_but_taken() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "--keep-alive-interval" not in parser.format_help()
    _, server = configs_of(parse("--keep-alive-interval", "0.5"))
    assert server.keep_alive_interval_s == 0.5


def test_choices_are_checked_on_the_command_line() -> None:
    with pytest.raises(SystemExit):
        parse("--kv-cache-dtype", "fp8")
    with pytest.raises(SystemExit):
        parse("--log-level", "loud")
