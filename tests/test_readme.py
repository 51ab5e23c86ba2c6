"""The README's Python examples run as written, in order, in one namespace."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python examples"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)


def test_readme_has_exactly_two_setup_commands():
    commands = re.findall(r"^pip install .*$", README.read_text(), flags=re.M)
    assert len(commands) == 2, commands
    assert commands[0].endswith("fastrank bench --quick")
    assert commands[1].endswith("python -m pytest")
