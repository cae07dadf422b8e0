"""The README's Quick start runs as pasted (its tensors are defined, its output is computed)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _quick_start_code() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_readme_quick_start_runs_as_pasted(capsys):
    code = _quick_start_code()
    namespace: dict = {}
    exec(compile(code, "README.md:Quick start", "exec"), namespace)  # noqa: S102
    acc = namespace["acc"]
    assert {"precision_at_1", "recall_at_8", "ndcg_at_10", "mean_average_precision_at_r"} <= set(
        acc
    )
    assert all(0.0 <= v <= 1.0 for k, v in acc.items() if k != "AMI")
    assert "precision_at_1" in capsys.readouterr().out
    # every imported name is used
    for name in re.findall(r"^from \S+ import (.+)$", code, flags=re.M):
        for n in name.split(","):
            assert code.count(n.strip()) > 1, n
