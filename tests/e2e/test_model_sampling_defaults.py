"""A real server on a tiny model whose generation_config.json asks for temperature 1.5, run
with ``--default-top-k 1``: a request that sets neither samples at 1.5 among one candidate,
which is the greedy answer; a request that sets its own ``top_k`` samples for real."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from fixtures_models import write_tiny_model
from rillet.server.sampling_defaults import MODEL_SOURCE
from server_process import ServerHandle, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny-with-defaults"))
    path = folder / "generation_config.json"
    generation = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**generation, "temperature": 1.5, "do_sample": True}))
    # float32: a random model's bf16 logits tie often, and top_k 1 keeps every tied token.
    model = ["--model", str(folder), "--dtype", "float32", "--max-total-tokens", "64"]
    handle = start_server([*model, "--grpc-port", "0", "--default-top-k", "1"])
    yield handle
    handle.stop()


def completion(server: ServerHandle, **fields: object) -> str:
    body = {"prompt": "The river", "max_tokens": 12, "ignore_eos": True, **fields}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def test_info_says_which_default_came_from_where(server: ServerHandle) -> None:
    info = httpx.get(f"{server.url}/info").json()
    assert info["sampling_defaults"] == {
        "temperature": {"value": 1.5, "source": MODEL_SOURCE},
        "top_k": {"value": 1, "source": "--default-top-k"},
    }


def test_unset_fields_take_the_defaults_and_set_ones_are_the_requests_own(
    server: ServerHandle,
) -> None:
    greedy = completion(server, temperature=0.0)
    assert completion(server) == greedy  # temperature 1.5 (model) over top_k 1 (flag)
    assert completion(server, seed=7) == greedy
    sampled = completion(server, top_k=0, seed=7)  # its own top_k: 1.5 over the whole vocab
    assert sampled != greedy
    assert completion(server, top_k=0, seed=7) == sampled  # seeded: the same draw again
