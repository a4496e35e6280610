"""The code-editing workload (``rillet bench --code-edit FILE``): a source file in the
prompt, asked back with one small change, so most of the answer is in the prompt.

This is the work prompt lookup (``--speculative ngram``) and other speculation are for:
the answer copies long runs of its input. Request ``i`` renames the ``i``-th identifier of
the file's own (its ``def`` names, in order), and the instruction comes first, so two
requests share only a few tokens of prefix: no prefix cache serves one request's file from
another's, and every request's TTFT is a real prefill. bench/data/code_edit_block_manager.py
(235 lines, a copy of rillet's block manager frozen for the benchmark) is ours.
"""

from __future__ import annotations

import re
from pathlib import Path

from rillet.benchmark.workload import Prompt

_DEF = re.compile(r"^\s*def ([A-Za-z_][A-Za-z0-9_]*)\(", re.MULTILINE)


class CodeEditPrompts:
    """Request ``i``'s prompt: rename one function of ``path`` and return the whole file."""

    def __init__(self, path: Path) -> None:
        try:
            self.source = path.read_text()
        except OSError as exc:
            raise ValueError(f"--code-edit: cannot read {path}: {exc.strerror}") from None
        found = dict.fromkeys(_DEF.findall(self.source))
        names = [name for name in found if not (name.startswith("__") and name.endswith("__"))]
        if not names:
            raise ValueError(f"--code-edit: {path} defines no function to rename")
        self.names = names
        self.language = "python" if path.suffix == ".py" else ""

    def __call__(self, index: int) -> Prompt:
        old = self.names[index % len(self.names)]
        new = f"{old}_v{index // len(self.names) + 2}"
        text = (
            f"Rename the function `{old}` to `{new}` everywhere in the file below (its "
            "definition and every use) and return the whole file, otherwise unchanged. "
            f"Reply with the code only.\n\n```{self.language}\n{self.source}```"
        )
        return Prompt.user(text)
