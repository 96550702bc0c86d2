"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:  # later blocks use names from earlier ones, as a reader would
        exec(compile(block, str(README), "exec"), namespace)
    plan = namespace["plan"]
    assert plan.total_steps == 10 * -(-60000 // 8192)
    assert abs(plan.lr - 1e-3 * (8192 / 256) ** 0.5) < 1e-12
