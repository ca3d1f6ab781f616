"""The README's usage examples run as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 4
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "kd_forward" in out and "torch.Size([5, 8])" in out and "'temperature'" in out
    assert re.search(r"^\d+\.\d+ \d+\.\d+$", out, re.M)        # the adapters' two losses
