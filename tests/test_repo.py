"""Repository wiring: CI runs the README's test command, scripts/test.sh does the whole set-up,
and nothing tracked depends on a path of the machine it was written on."""

import os
import re
import shutil
import stat
import subprocess

from conftest import ROOT

TEST_COMMAND = "bash scripts/test.sh"


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def bash_blocks(text):
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_test_command():
    blocks = bash_blocks(read("README.md"))
    assert blocks[1] == TEST_COMMAND  # the second command at the top of the README
    ci_lines = [line.strip() for line in read(".ci/run").splitlines()]
    assert ci_lines[-1] == TEST_COMMAND


def test_readme_commands_name_real_files():
    first, second = bash_blocks(read("README.md"))[:2]
    named = re.findall(r"(configs/\S+\.yaml|requirements\S*\.txt|sample\.py|scripts/\S+\.sh)",
                       first + "\n" + second)
    assert "sample.py" in named and "scripts/test.sh" in named
    for path in named:
        assert os.path.exists(os.path.join(ROOT, path)), path


def _tracked_text_files():
    """Python, shell, yaml and markdown files of the repository: git's tracked files and new
    ones it does not ignore (the same set in a fresh clone); a plain walk without git."""
    if os.path.isdir(os.path.join(ROOT, ".git")):
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=ROOT, check=True,
                             capture_output=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
    else:
        files = []
        for d, dirs, names in os.walk(ROOT):
            dirs[:] = [x for x in dirs if x == ".ci" or not (x.startswith(".") or
                                                             x == "__pycache__")]
            files += [os.path.relpath(os.path.join(d, f), ROOT) for f in names]
    picked = []
    for f in files:
        path = os.path.join(ROOT, f)
        if not os.path.isfile(path):
            continue  # deleted in the work tree, not yet in the index
        if f.endswith((".py", ".sh", ".yaml", ".yml", ".md")):
            picked.append(f)
        else:
            with open(path, "rb") as fh:
                if fh.read(2) == b"#!":  # scripts without an extension (.ci/run)
                    picked.append(f)
    return picked


def test_no_machine_paths_in_tracked_files():
    # Built by concatenation so that this file does not match itself.
    patterns = ["/" + "work/", ".." + "/shared", "/" + "home/", "/" + "Users/"]
    files = _tracked_text_files()
    assert {"tests/test_repo.py", ".ci/run", "scripts/test.sh", "README.md"} <= set(files)
    hits = []
    for f in files:
        with open(os.path.join(ROOT, f), encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                hits += [f"{f}:{n}: {line.strip()}" for p in patterns if p in line]
    assert not hits, "machine-specific paths:\n" + "\n".join(hits)


# ------------------------------------------------------------------ scripts/test.sh, run on stubs

STUB = """#!/bin/bash
printf '%s' "$(basename "$0")" >> "$STUB_LOG"; printf ' <%s>' "$@" >> "$STUB_LOG"
echo >> "$STUB_LOG"
{body}
"""
STUBS = {
    "id": 'echo "$STUB_UID"',
    "sudo": 'exec "$@"',
    "apt-get": "exit 0",
    # python3 -m venv DIR writes an activate script that marks the environment as active
    # python3 -c "import ensurepip" succeeds when STUB_ENSUREPIP=1
    "python3": ('[ "$1" = -c ] && { [ "$STUB_ENSUREPIP" = 1 ]; exit; }\n'
                '[ "$1 $2" = "-m venv" ] && mkdir -p "$3/bin" && '
                'echo "export VIRTUAL_ENV=$PWD/$3" > "$3/bin/activate"\nexit 0'),
    # pytest exits 3, everything else 0
    "python": '[ "$1 $2" = "-m pytest" ] && exit 3\nexit 0',
}


# torch-fidelity without its dependencies (torchvision stays out): requirements-test.txt's
# "#no-deps" line, installed in a second pip call.
NO_DEPS = "python <-m> <pip> <install> <--quiet> <--no-deps> <torch-fidelity==0.4.0>"


def test_requirements_pin_torch_fidelity_without_torchvision():
    with open(os.path.join(ROOT, "requirements-test.txt")) as f:
        lines = [line.strip() for line in f]
    assert "#no-deps torch-fidelity==0.4.0" in lines
    assert not any(line.startswith(("torchvision", "torch-fidelity", "torch_fidelity"))
                   for line in lines)


def _run_script(tmp_path, *, uid, chromium, venv, ensurepip, args=()):
    """Run a copy of scripts/test.sh in a bare clone-like folder, with every outside command
    (apt-get, sudo, id, python3, python) replaced by a stub that logs its arguments."""
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "scripts", "test.sh"), clone / "scripts" / "test.sh")
    shutil.copy(os.path.join(ROOT, "requirements-test.txt"), clone / "requirements-test.txt")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(STUB.format(body=body))
        (bin_dir / name).chmod(stat.S_IRWXU)
    browser = tmp_path / "chromium"
    if chromium:
        browser.write_text("#!/bin/sh\n")
        browser.chmod(stat.S_IRWXU)
    log = tmp_path / "log"
    log.write_text("")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(log), "STUB_UID": str(uid),
           "STUB_ENSUREPIP": "1" if ensurepip else "0",
           "PIXELFLOW_CHROMIUM": str(browser),
           "HOME": str(tmp_path)}
    if venv:
        env["VIRTUAL_ENV"] = str(tmp_path / "active-venv")
    rc = subprocess.run(["bash", str(clone / "scripts" / "test.sh"), *args], env=env,
                        cwd=tmp_path, timeout=60).returncode
    return rc, log.read_text().splitlines(), clone


def test_script_on_a_fresh_machine(tmp_path):
    """No Chromium, no python3-venv, not root, no virtualenv: all gets installed."""
    # what the README's first command leaves behind where python3-venv is missing
    (tmp_path / "clone" / ".venv" / "bin").mkdir(parents=True)
    rc, log, clone = _run_script(tmp_path, uid=1000, chromium=False, venv=False,
                                 ensurepip=False, args=["tests/test_x.py", "-k", "a and b"])
    assert rc == 3  # pytest's exit status
    assert log == [
        "python3 <-c> <import ensurepip>",
        "id <-u>",
        "sudo <apt-get> <update> <-qq>",
        "apt-get <update> <-qq>",
        "sudo <env> <DEBIAN_FRONTEND=noninteractive> <apt-get> <install> <-y> <-qq> "
        "<--no-install-recommends> <chromium> <fonts-dejavu-core> <python3-venv>",
        "apt-get <install> <-y> <-qq> <--no-install-recommends> <chromium> <fonts-dejavu-core> "
        "<python3-venv>",
        "python3 <-m> <venv> <.venv>",
        "python <-m> <pip> <install> <--quiet> <-r> <requirements-test.txt>",
        NO_DEPS,
        "python <-m> <pytest> <-q> <tests/test_x.py> <-k> <a and b>",
    ]
    assert (clone / ".venv" / "bin" / "activate").is_file()  # inside the clone


def test_script_on_a_ready_machine(tmp_path):
    """Chromium present, inside a virtualenv: only pip and pytest run."""
    rc, log, clone = _run_script(tmp_path, uid=0, chromium=True, venv=True,
                                 ensurepip=False)
    assert rc == 3
    assert log == ["python <-m> <pip> <install> <--quiet> <-r> <requirements-test.txt>",
                   NO_DEPS, "python <-m> <pytest> <-q>"]
    assert not (clone / ".venv").exists()


def test_script_as_root_without_chromium(tmp_path):
    """Root runs apt-get itself (no sudo); an existing .venv is reused, not recreated."""
    venv_bin = tmp_path / "clone" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text("export VIRTUAL_ENV=$PWD/.venv\n")
    rc, log, _ = _run_script(tmp_path, uid=0, chromium=False, venv=False,
                             ensurepip=True)
    assert rc == 3
    assert log == [
        "id <-u>",
        "apt-get <update> <-qq>",
        "apt-get <install> <-y> <-qq> <--no-install-recommends> <chromium> <fonts-dejavu-core>",
        "python <-m> <pip> <install> <--quiet> <-r> <requirements-test.txt>",
        NO_DEPS,
        "python <-m> <pytest> <-q>",
    ]
