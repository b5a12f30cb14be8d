"""The README's Python example runs as written, and CI runs exactly the README's test command."""
import re

import transformers

from launch_utils import ROOT


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert all(int(l.merge_count) == 3 for _, l in scope["relora_ds"].relora_layers(scope["model"]))
    assert transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out/hf").config.hidden_size == 64


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
    assert "bash scripts/demo.sh" in readme
