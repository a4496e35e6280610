"""``rillet bench``: a closed-loop load generator for OpenAI-compatible streaming servers.

It works against any server with ``/v1/chat/completions`` or ``/v1/completions`` and SSE
streaming (rillet, vLLM, llama.cpp, llama-cpp-python, TGI's OpenAI route), so peers are
measured with the same harness. One module per concern:

* ``workload``: the run's settings (:class:`BenchConfig`) and the fixed prompt set
* ``stream``: one streamed request, timed (:class:`RequestRecord`)
* ``stats``: percentiles and the per-level summary (one JSON line per level)
* ``sysstat``: CPU seconds of the server's process tree and of the host, from ``/proc``
* ``runner``: the closed loop at each concurrency level, with time caps
* ``progress``: the progress line on stderr; ``plot``: the PNG (matplotlib, optional)
* ``cli``: the ``rillet bench`` subcommand and its arguments, shared with
  ``python bench/serve.py``

Importing this package is cheap (no httpx, no torch) so the CLI can register it.
"""

from __future__ import annotations

from rillet.benchmark.workload import BenchConfig

__all__ = ["BenchConfig"]
