"""rillet's KServe v2 messages: generated from the .proto as committed, wire-compatible with
tritonclient's, importable beside them, and picklable (Ray's gRPC proxy pickles them)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from rillet.errors import ValidationError
from rillet.kserve import grpc_service_pb2 as pb
from rillet.kserve import tensors

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_modules_are_what_the_proto_generates(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_grpc.sh"), str(tmp_path)],
        check=True,
        cwd=ROOT,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    for name in ("grpc_service_pb2.py", "grpc_service_pb2.pyi"):
        fresh = (tmp_path / "rillet" / "kserve" / name).read_text()
        assert fresh == (ROOT / "src" / "rillet" / "kserve" / name).read_text(), name


def test_wire_compatible_with_tritonclient_and_importable_beside_it() -> None:
    from tritonclient.grpc import service_pb2 as theirs

    ours = pb.ModelInferRequest(model_name="m", id="7")
    ours.parameters["triton_enable_empty_final_response"].bool_param = True
    ours.parameters["temperature"].double_param = 0.5
    ours.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    ours.raw_input_contents.append(tensors.pack_bytes([b"Hi"]))
    back = theirs.ModelInferRequest.FromString(ours.SerializeToString())
    assert back.id == "7" and back.parameters["temperature"].double_param == 0.5
    assert back.inputs[0].name == "text_input" and back.raw_input_contents == [
        b"\x02\x00\x00\x00Hi"
    ]
    assert pb.ModelInferRequest.FromString(back.SerializeToString()) == ours
    assert pickle.loads(pickle.dumps(ours)) == ours


def test_bytes_tensors_round_trip_and_bad_ones_are_refused() -> None:
    items = [b"", b"abc", "é".encode()]
    assert tensors.unpack_bytes(tensors.pack_bytes(items)) == items
    assert tensors.decode("x", "BOOL", [2], b"\x01\x00", None) == [True, False]
    assert tensors.decode("x", "INT32", [1], tensors.encode("INT32", [-3]), None) == [-3]
    for raw in (b"\x05\x00\x00\x00ab", b"\x01\x00"):
        with pytest.raises(ValidationError):
            tensors.unpack_bytes(raw)
    with pytest.raises(ValidationError, match="shape"):
        tensors.decode("x", "BYTES", [2], tensors.pack_bytes([b"a"]), None)
    with pytest.raises(ValidationError, match="not supported"):
        tensors.decode("x", "FP16", [1], b"\x00\x00", None)
