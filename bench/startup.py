"""How long a start takes, and where it goes.

``ready``: runs ``python -m rillet serve --port 0 --grpc-port 0 ARGS`` (or any command given
after ``--``) and times it until ``GET /health`` answers 200, printing when each line of its
output arrived; ``--runs N`` repeats it.

``phases``: builds the engine in this process (``build_engine``) and prints the wall and
CPU seconds of each phase: reading the GGUF, decoding its codes, dequantizing, quantizing,
packing, the weight cache. Phases a tree lacks are left out, so the same script measures an
older checkout (``PYTHONPATH=old/src``).

    .venv/bin/python bench/startup.py ready --runs 2 -- --model qwen2.5-coder-1.5b
    RILLET_WEIGHT_CACHE=0 .venv/bin/python bench/startup.py ready -- --model qwen2.5-coder-1.5b
    .venv/bin/python bench/startup.py ready -- scripts/serve.sh --port 0
    .venv/bin/python bench/startup.py phases qwen2.5-coder-1.5b [--no-cache]
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

_URL = re.compile(r" on (http://[\d.]+:\d+)")


def ready(command: list[str], deadline_s: float = 600.0) -> float | None:
    """Seconds from launching ``command`` until its /health is 200 (None: it never was)."""
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"{time.monotonic() - start:7.2f}s  {line.rstrip()}", flush=True)
            if not found and (match := _URL.search(line)):
                found.append(match.group(1))

    threading.Thread(target=pump, daemon=True).start()
    took = None
    while took is None and proc.poll() is None and time.monotonic() - start < deadline_s:
        if found:
            try:
                with urllib.request.urlopen(found[0] + "/health", timeout=2) as response:
                    if response.status == 200:
                        took = time.monotonic() - start
            except OSError:
                pass
        time.sleep(0.05)
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    return took


def phases(model: str | None, cache: bool) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds per phase of one ``build_engine``."""
    times: dict[str, tuple[float, float]] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    import torch  # noqa: F401 -- timed as a phase of its own

    times["import torch"] = (time.perf_counter() - t0, time.process_time() - c0)
    from rillet.config import EngineConfig
    from rillet.engine import builder
    from rillet.models import causal_lm, gguf_weights, linear

    def timed(owner: Any, name: str, label: str) -> None:
        if not hasattr(owner, name):
            return
        bound = vars(owner).get(name) if isinstance(owner, type) else None
        is_classmethod = isinstance(bound, classmethod)
        original: Callable[..., Any] = bound.__func__ if is_classmethod else getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                w, c = times.get(label, (0.0, 0.0))
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                times[label] = (w + wall, c + cpu)

        setattr(owner, name, classmethod(wrapper) if is_classmethod else wrapper)

    try:
        setup: Any = importlib.import_module("rillet.engine.model_setup")
    except ImportError:  # a tree from before the weight cache
        setup = builder
    timed(builder, "load_model_files", "read the GGUF header and tokenizer")
    timed(builder.cpu_kernels, "load", "load the kernels")
    timed(causal_lm.CausalLM, "empty", "  allocate the model")
    timed(causal_lm.CausalLM, "load_group_codes", "  the file's codes to the layers")
    timed(gguf_weights, "group_codes", "    decode codes")
    timed(causal_lm.CausalLM, "load_weights", "  load float weights")
    timed(gguf_weights, "dequantize_tensor", "    dequantize")
    timed(setup, "enable_quantized_weights", "  quantized copies")
    timed(linear.group_quantization, "quantize", "    quantize")
    timed(linear.group_quantization, "pack", "    pack")
    timed(setup, "enable_packed_weights", "  bf16 packing")
    cache_module = getattr(setup, "weight_cache", None)
    if cache_module is not None:
        timed(cache_module, "load", "  map the weight cache entry")
    timed(builder, "ModelRunner", "KV cache and runner")
    kwargs = {} if cache_module is None else {"weight_cache": cache}
    wall, cpu = time.perf_counter(), time.process_time()
    builder.build_engine(EngineConfig(model=model, **kwargs))
    times["build_engine, in all"] = (time.perf_counter() - wall, time.process_time() - cpu)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    ready_parser = sub.add_parser("ready", help="time a start until /health is 200")
    ready_parser.add_argument("--runs", type=int, default=1)
    ready_parser.add_argument("command", nargs="*", help="rillet serve's arguments, or a command")
    phases_parser = sub.add_parser("phases", help="where build_engine's time goes")
    phases_parser.add_argument("model", nargs="?", help="default: the bundled model")
    phases_parser.add_argument("--no-cache", action="store_true", help="build afresh")
    args = parser.parse_args()
    if args.what == "ready":
        command = args.command
        if not command or command[0].startswith("-"):
            serve = [sys.executable, "-m", "rillet", "serve", "--port", "0", "--grpc-port", "0"]
            command = serve + command
        results = [ready(command) for _ in range(args.runs)]
        shown = ", ".join("never" if r is None else f"{r:.2f}s" for r in results)
        print(f"ready (GET /health 200) after: {shown}")
        return
    print(f"{'wall':>8} {'CPU':>8}")
    for label, (wall, cpu) in phases(args.model, not args.no_cache).items():
        if wall >= 0.005:
            print(f"{wall:7.2f}s {cpu:7.2f}s  {label}")


if __name__ == "__main__":
    main()
