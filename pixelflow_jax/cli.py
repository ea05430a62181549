"""The command-line layer shared by every entry point.

``sample.py``, ``app.py``, ``train.py``, ``convert_torch.py``,
``python -m pixelflow_jax.init_checkpoint`` and ``python -m pixelflow_jax.digits``
all build their parser with :class:`Parser` and run through :func:`run_main`, so
they behave alike: a usage mistake or a :class:`~pixelflow_jax.errors.UserError`
is one line on stderr and exit code 2, Ctrl-C is one line and exit code 130,
and every output path is checked (:func:`check_output`) before any work starts.

This module imports no JAX at import time: parsing and the output checks stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import tempfile
from typing import Callable, Iterator, NoReturn

from pixelflow_jax import defaults
from pixelflow_jax.errors import UserError

# Exit codes, one place for all tools.
EXIT_OK = 0
EXIT_USER = 2          # bad flags, values, files or paths
EXIT_UNFINISHED = 3    # sample.py: images not written (Dopri5 step limit, or non-finite)
EXIT_NAN = 3           # train.py: non-finite loss (the last checkpoint is intact)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_PREEMPTED = 143   # train.py: SIGTERM, checkpoint saved; schedulers read it as "retry"


def one_line(text: str) -> str:
    """``text`` with its lines joined by spaces (messages must stay on one line)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit code 2.

    ``doc``: a module docstring; its first paragraph becomes the description and
    the rest the epilog of ``--help`` (kept as written).
    """

    def __init__(self, *args, doc: str | None = None, **kwargs) -> None:
        if doc:
            head, _, rest = doc.strip("\n").partition("\n\n")
            kwargs.setdefault("description", head)
            if rest:
                kwargs.setdefault("epilog", rest)
            kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # argparse says "argument --cfg: must be ..."; say "--cfg must be ..." instead.
        m = re.fullmatch(r"argument (\S+): (must .*)", message, re.DOTALL)
        if m:
            message = f"{m[1]} {m[2]}"
        self.exit(EXIT_USER, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def run_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
             argv: list[str] | None = None, *,
             interrupted: str | Callable[[argparse.Namespace], str] = "stopped") -> int:
    """Parse ``argv`` and call ``run(args)``; returns the exit code.

    ``--help`` and usage errors return argparse's code (0 or 2, already printed);
    a :class:`UserError` prints ``PROG: error: MESSAGE`` and returns 2; Ctrl-C
    prints ``PROG: interrupted; INTERRUPTED`` (a text, or a function of the
    arguments that says what was kept) and returns 130.
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USER)
    try:
        return run(args)
    except UserError as e:
        print(f"{parser.prog}: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        what = interrupted(args) if callable(interrupted) else interrupted
        print(f"{parser.prog}: interrupted; {what}", file=sys.stderr)
        return EXIT_INTERRUPTED


# --------------------------------------------------------------------------- value types
# argparse ``type=`` functions. Their messages start with "must" so that Parser.error
# prints "--flag must ...".


def _value_type(name: str, convert: Callable[[str], object], ok: Callable[[object], bool],
                want: str) -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value
    parse.__name__ = name
    return parse


positive_int = _value_type("positive_int", int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _value_type("non_negative_int", int, lambda v: v >= 0, "an integer >= 0")
positive_float = _value_type("positive_float", float,
                             lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
non_negative_float = _value_type("non_negative_float", float,
                                 lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
seed = _value_type("seed", int, lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2^32)")
port = _value_type("port", int, lambda v: 0 < v < 65536, "in 1..65535")


def int_list(text: str) -> list[int]:
    """``"1,2 3"`` -> ``[1, 2, 3]`` (comma- or space-separated integers)."""
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}")
    return values


def positive_int_list(text: str) -> list[int]:
    """:func:`int_list` whose values are all >= 1."""
    values = int_list(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be integers >= 1, got {text}")
    return values


# --------------------------------------------------------------------------- shared flags


def add_ckpt(parser: argparse.ArgumentParser,
             default: str = "the default") -> None:
    """``--ckpt DIR`` (sample.py, app.py, reflow); ``default`` says what its absence means."""
    parser.add_argument(
        "--ckpt", metavar="DIR", default=None,
        help="checkpoint folder (config.yaml + params/, optionally class_names.txt) written "
             "by this project or by convert_torch.py, or a short name: digits (the embedded "
             "model, a small PixelFlow trained on handwritten digits, "
             f"pixelflow_jax/weights/digits; {default}) or digits-1step (its one-step "
             "student, pixelflow_jax/weights/digits-1step)")


def add_dtype(parser: argparse.ArgumentParser) -> None:
    """``--dtype``: the compute dtype."""
    parser.add_argument(
        "--dtype", choices=defaults.DTYPES, default="auto",
        help="compute dtype; auto = bfloat16 on GPU/TPU, float32 on CPU (parameters stay "
             "float32) (default %(default)s)")


# The T5 encoder's dtypes (float16 is not offered: T5's activations overflow it).
TEXT_DTYPES = ("float32", "bfloat16")


def add_text_dtype(parser: argparse.ArgumentParser) -> None:
    """``--text-dtype``: the T5 encoder's parameter and compute dtype (DESIGN §7, §9)."""
    parser.add_argument(
        "--text-dtype", choices=TEXT_DTYPES, default=None,
        help="text-to-image: the T5 encoder's parameters and matmuls; float32 = the "
             "official pipeline's features (parity); bfloat16 halves the encoder's memory "
             "(flan-t5-xl: 2.4 GB instead of 4.9 GB) and suits GPU/TPU; its features "
             "move by ~1-2%% (norms and softmax stay float32); float16 is not offered, "
             "T5's activations overflow it (default: float32)")


def add_attention(parser: argparse.ArgumentParser) -> None:
    """``--attention``: the attention kernel."""
    from pixelflow_jax.attention import IMPLEMENTATIONS

    parser.add_argument(
        "--attention", choices=IMPLEMENTATIONS, default="auto",
        help="attention kernel; auto = cuDNN flash attention on GPU in bf16, else XLA "
             "(query-chunked for long sequences) (default %(default)s)")


def add_distributed(parser: argparse.ArgumentParser) -> None:
    """``--distributed``: multi-host start-up."""
    parser.add_argument(
        "--distributed", choices=("auto", "on", "off"), default="auto",
        help="call jax.distributed.initialize(): auto = when launched on several hosts "
             "(multi-host TPU slice, SLURM, MPI, or a coordinator address) "
             "(default %(default)s)")


# --------------------------------------------------------------------------- output paths

# Kernel and device filesystems: writing there is never what the user meant.
_SYSTEM_PREFIXES = ("/proc", "/sys", "/dev")
_SYSTEM_ALLOWED = ("/dev/shm",)  # shared-memory tmpfs: real (if volatile) storage
_SYSTEM_TYPES = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
    "securityfs", "configfs", "pstore", "bpf", "mqueue", "fusectl", "binfmt_misc",
    "efivarfs", "hugetlbfs", "rpc_pipefs", "nsfs", "autofs"})
OUTPUT_KINDS = ("file", "folder", "replace")


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _mount_type(path: str) -> tuple[str, str] | None:
    """(mount point, filesystem type) of the mount holding ``path``; None off Linux."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # The mount table escapes spaces and the like as octal (\040).
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1])
        if _within(path, point) and (best is None or len(point) >= len(best[0])):
            best = (point, fields[2])
    return best


def _system_filesystem(real: str) -> str | None:
    """A description of the kernel/device filesystem ``real`` lies on, else None."""
    if not any(_within(real, a) for a in _SYSTEM_ALLOWED):
        for prefix in _SYSTEM_PREFIXES:
            if _within(real, prefix):
                return prefix
    mount = _mount_type(real)
    if mount and mount[1] in _SYSTEM_TYPES:
        return f"{mount[0]} ({mount[1]})"
    return None


def _probe_writable(folder: str, what: str) -> None:
    """Create and remove a file in ``folder``: the one test of writability that also
    sees read-only mounts, ACLs and quotas (os.access does not)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"cannot write {what}: {folder} is not writable "
                        f"({e.strerror or e})") from None


def check_output(path: str, flag: str, kind: str = "file", *,
                 overwrite: bool | None = None) -> str:
    """Check, before any work, that the output ``path`` given to ``flag`` can be written.

    ``kind``: ``"file"`` (written via a temporary file and a rename), ``"folder"``
    (created if missing, files written inside) or ``"replace"`` (a folder built
    beside and renamed into place; with ``overwrite=False`` it must not exist).
    Refuses an empty or invalid name, a folder where a file is wanted (and the
    reverse), paths on kernel/device filesystems (/proc, /sys, /dev), a parent
    that is a file, and folders where a test file cannot be created. Missing
    parent folders are fine (see :func:`make_parents`). Returns the absolute path;
    raises :class:`UserError`.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    noun = "file" if kind == "file" else "folder"
    if not path or not path.strip():
        raise UserError(f"{flag} is empty: give a {noun} path")
    what = f"{flag} {path}"
    if "\0" in path:
        raise UserError(f"cannot write {flag} {path!r}: a path cannot contain a NUL character")
    target = os.path.abspath(path)
    too_long = [c for c in target.split(os.sep) if len(os.fsencode(c)) > 255]
    if too_long:
        raise UserError(f"cannot write {what}: the name {too_long[0][:40]}... is longer than "
                        "255 bytes")
    system = _system_filesystem(os.path.realpath(target))
    if system:
        raise UserError(f"cannot write {what}: {system} is a kernel/device filesystem, not "
                        "storage")
    if kind == "file":
        if path.endswith(("/", os.sep)) or os.path.isdir(target):
            raise UserError(f"cannot write {what}: it is a folder, expected a file path")
    elif os.path.lexists(target) and not os.path.isdir(target):
        raise UserError(f"cannot write {what}: it exists and is not a folder")
    if kind == "replace" and overwrite is False and os.path.lexists(target):
        raise UserError(f"cannot write {what}: it exists already (pass --overwrite to "
                        "replace it)")
    if kind == "folder" and os.path.isdir(target):
        _probe_writable(target, what)  # files go inside; its parent may be read-only
        return target
    ancestor = os.path.dirname(target)  # where the first file or folder will be created
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UserError(f"cannot write {what}: {ancestor} is a file, not a folder")
    _probe_writable(ancestor, what)
    return target


def make_parents(path: str) -> None:
    """Create the folders above ``path`` (checked by :func:`check_output`)."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {path}: cannot create {parent} "
                        f"({e.strerror or e})") from None


def check_distinct(dst: str, src: str, dst_flag: str, src_flag: str, *,
                   inside_ok: bool = True) -> None:
    """Refuse an output ``dst`` that would destroy the input ``src``: the same path, or
    a folder that contains it (and with ``inside_ok=False``, a path inside it)."""
    d, s = os.path.realpath(dst), os.path.realpath(src)
    if _within(s, d):
        how = "is" if d == s else "contains"
        raise UserError(f"{dst_flag} {dst} {how} {src_flag} {src}: writing it would destroy "
                        "the input")
    if not inside_ok and _within(d, s):
        raise UserError(f"{dst_flag} {dst} lies inside {src_flag} {src}; choose a path "
                        "outside it")


def _in_zone(name: str | bytes, path: str) -> bool:
    """Is ``name`` the output ``path``, inside it, or a sibling named ``path.*`` (the
    temporary and old folders of an atomic replace)?"""
    a, p = os.path.abspath(os.fsdecode(name)), os.path.abspath(path)
    return _within(a, p) or (os.path.dirname(a) == os.path.dirname(p)
                             and os.path.basename(a).startswith(os.path.basename(p) + "."))


@contextlib.contextmanager
def writing(path: str, *, unnamed: bool = True) -> Iterator[None]:
    """Turn an OSError raised while writing the output ``path`` into a one-line
    :class:`UserError` naming it. Errors about other files pass through unchanged;
    errors naming no file are converted only when ``unnamed`` (set it False around
    code that also does other I/O)."""
    try:
        yield
    except OSError as e:
        names = [n for n in (e.filename, e.filename2) if n is not None]
        if (names and not any(_in_zone(n, path) for n in names)) or (not names and not unnamed):
            raise
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
