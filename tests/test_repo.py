"""Repository wiring: CI runs the README's test command; the README's first commands exist."""

import os
import re

from conftest import ROOT


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def bash_blocks(text):
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_test_command():
    blocks = bash_blocks(read("README.md"))
    test_command = blocks[1]  # the second command at the top of the README
    assert "pytest" in test_command and "\n" not in test_command
    ci_lines = [line.strip() for line in read(".ci/run").splitlines()]
    assert ci_lines[-1] == test_command


def test_readme_first_command_names_real_files():
    first = bash_blocks(read("README.md"))[0]
    for path in re.findall(r"(configs/\S+\.yaml|requirements\S*\.txt|sample\.py)", first):
        assert os.path.exists(os.path.join(ROOT, path)), path
