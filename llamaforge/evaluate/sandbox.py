"""Run untrusted programs (generated code and its unit tests) in a sandbox.

Each program runs in its own process, started from a fresh interpreter in isolated mode (``python -I -S``:
no site-packages, no ``PYTHON*`` variables, no current directory on the path) with a minimal
environment, standard input from /dev/null, no inherited file descriptors, in a new session, and a new
temporary working directory that is deleted afterwards. ``sandbox_child.py`` then shuts it in: no root,
new user/network/PID namespaces, CPU/memory/process/file-size limits and Landlock (read-only system,
writable work directory only, no TCP); see there. The parent enforces the wall-clock limit by killing the
whole process group (and with it the PID namespace).

By default the sandbox requires that the file system and the network are actually shut off
(``require=("filesystem", "network", "processes")``); where the kernel cannot do that (not Linux, Linux before 5.13,
Landlock disabled) ``run`` raises ``SandboxUnavailableError`` before any program runs, unless the caller
accepts resource limits alone (``require=()``).

A program passes when it exits with status 0; anything else (an exception, a failed assertion, a timeout,
a limit) is a failure with its reason, never an error of the evaluation.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError

CHILD = Path(__file__).with_name("sandbox_child.py")
EXIT_SETUP_FAILED = 125  # sandbox_child.EXIT_SETUP_FAILED
REQUIREMENTS = ("filesystem", "network", "processes")  # what a program is kept from by default
OUTPUT_TAIL = 2000  # characters of stdout/stderr kept per run
SIGNAL_REASONS = {signal.SIGXCPU: "CPU time limit exceeded", signal.SIGKILL: "killed (SIGKILL)",
                  signal.SIGSEGV: "segmentation fault", signal.SIGXFSZ: "file size limit exceeded",
                  signal.SIGABRT: "aborted"}  # fmt: skip


class SandboxUnavailableError(UserError):
    """This system cannot isolate programs as required; nothing was run."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits: wall-clock and CPU seconds, address space, processes, bytes written per file."""

    timeout: float = 10.0
    cpu_seconds: float = 10.0
    memory_bytes: int = 1 << 30
    processes: int = 32
    file_bytes: int = 16 << 20
    open_files: int = 256

    def __post_init__(self) -> None:
        for name in ("timeout", "cpu_seconds", "memory_bytes", "processes", "file_bytes", "open_files"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox limit {name} must be positive, got {getattr(self, name)}")


@dataclass
class ExecResult:
    """The outcome of one program: ``passed`` (exit status 0) or the ``reason`` it failed."""

    passed: bool
    reason: str  # "passed", "timed out after 10 s", "exit status 1: AssertionError", "CPU time limit exceeded", ...
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""
    isolation: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("isolation")
        return out


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * OUTPUT_TAIL))
            data = f.read()
    except OSError:
        return ""
    return data.decode("utf-8", "replace")[-OUTPUT_TAIL:]


def _last_error_line(stderr: str) -> str:
    """The exception line of a Python traceback ("AssertionError", "NameError: name 'x' is not defined")."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    last = lines[-1].strip()
    return last[:200]


def _reason(code: int, stderr: str) -> str:
    if code == 0:
        return "passed"
    if code > 128 and (code - 128) in SIGNAL_REASONS:
        return SIGNAL_REASONS[signal.Signals(code - 128)]
    detail = _last_error_line(stderr)
    if "MemoryError" in detail:
        return "memory limit exceeded (MemoryError)"
    return f"exit status {code}" + (f": {detail}" if detail else "")


class Sandbox:
    """Runs Python programs in isolated processes; ``isolation`` reports what the last run was shut in by."""

    def __init__(self, limits: SandboxLimits | None = None, require: Sequence[str] = REQUIREMENTS,
                 python: str | None = None) -> None:  # fmt: skip
        unknown = set(require) - set(REQUIREMENTS)
        if unknown:
            raise ValueError(f"unknown sandbox requirement(s): {', '.join(sorted(unknown))}")
        self.limits = limits or SandboxLimits()
        self.require = tuple(require)
        self.python = python or sys.executable
        self.isolation: dict = {}
        self._checked = False

    def check(self) -> None:
        """Raise ``SandboxUnavailableError`` now, before hours of generation, when programs cannot run as required."""
        if not self._checked:
            result = self.run("pass")
            if not result.passed:
                raise SandboxUnavailableError(f"the sandbox cannot run an empty program: {result.reason}")
            self._checked = True

    def run(self, source: str) -> ExecResult:
        """Run `source` as a program; its result (a setup failure raises ``SandboxUnavailableError``)."""
        limits = self.limits
        with tempfile.TemporaryDirectory(prefix="llamaforge-sandbox-") as outer:
            work = Path(outer) / "work"  # the program's directory; its output files stay outside it
            work.mkdir()
            program = work / "program.py"
            program.write_text(source, encoding="utf-8")
            stdout, stderr = Path(outer) / "stdout", Path(outer) / "stderr"
            status_r, status_w = os.pipe()
            config = {"work_dir": str(work), "program": str(program), "status_fd": status_w,
                      "cpu_seconds": limits.cpu_seconds, "memory_bytes": limits.memory_bytes,
                      "processes": limits.processes, "file_bytes": limits.file_bytes,
                      "open_files": limits.open_files, "require": list(self.require)}  # fmt: skip
            env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
                   "PYTHONIOENCODING": "utf-8"}  # fmt: skip
            start = time.perf_counter()
            try:
                with open(stdout, "wb") as out, open(stderr, "wb") as err:
                    proc = _start([self.python, "-I", "-S", str(CHILD), json.dumps(config)], cwd=work, env=env,
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                                  pass_fds=(status_w,), start_new_session=True)  # fmt: skip
            except BaseException:
                os.close(status_r)
                raise
            finally:
                os.close(status_w)
            try:
                timed_out = not _wait_unreaped(proc, start + limits.timeout)
            finally:
                # Whatever is left (the namespace's init, children that outlived the program) dies with the
                # group; the leader is reaped only afterwards, so its group id cannot have been reused.
                _kill_group(proc.pid)
                code = proc.wait()
            seconds = time.perf_counter() - start
            with os.fdopen(status_r, "r") as f:
                status_text = f.read()
            self.isolation = json.loads(status_text.splitlines()[0]) if status_text.strip() else {}
            err_text = _tail(stderr)
            if code == EXIT_SETUP_FAILED and self.isolation.get("missing") is not None:
                raise SandboxUnavailableError(_unavailable_message(self.isolation, err_text))
            if not self.isolation and not timed_out:
                raise SandboxUnavailableError(f"the sandbox process failed before reporting (exit status {code}): "
                                         f"{_last_error_line(err_text) or 'no output'}")  # fmt: skip
            reason = f"timed out after {limits.timeout:g} s" if timed_out else _reason(code, err_text)
            result = ExecResult(code == 0 and not timed_out, reason, None if timed_out else code, round(seconds, 3),
                                _tail(stdout), err_text, dict(self.isolation))  # fmt: skip
            _remove_tree(work)
        return result

    def run_many(self, sources: Sequence[str], workers: int | None = None,
                 progress: Callable[[int], None] | None = None) -> list[ExecResult]:  # fmt: skip
        """Run every program, `workers` at a time (default: the CPU count); `progress(1)` after each."""
        if not sources:
            return []
        workers = max(1, min(workers or os.cpu_count() or 1, len(sources)))
        first = self.run(sources[0])  # a setup failure surfaces once, before the rest start
        if progress:
            progress(1)
        results: list[ExecResult] = [first]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(self.run, sources[1:]):
                results.append(result)
                if progress:
                    progress(1)
        return results


def _start(*args, **kwargs) -> subprocess.Popen:  # subprocess.Popen, failing as SandboxUnavailableError
    try:
        return subprocess.Popen(*args, **kwargs)
    except OSError as exc:
        raise SandboxUnavailableError(f"cannot start the sandbox's Python ({args[0][0]}): {exc}") from exc


def _wait_unreaped(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait until `proc` exits or `deadline` passes (False), leaving it a zombie until ``proc.wait()``."""
    delay = 0.0005
    while True:
        if hasattr(os, "waitid"):
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        elif proc.poll() is not None:
            return True
        if time.perf_counter() >= deadline:
            return False
        time.sleep(delay)
        delay = min(2 * delay, 0.02)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _remove_tree(path: Path) -> None:
    """Delete the work directory even where the program removed its own permissions."""

    def make_writable(func, p, exc_info):  # shutil.rmtree's onerror
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable)


def _unavailable_message(applied: dict, stderr: str) -> str:
    missing = applied.get("missing") or []
    parts = []
    if "filesystem" in missing:
        why = applied.get("landlock_error") or "no Landlock"
        parts.append(f"cannot keep programs out of your files ({why}; Landlock needs Linux >= 5.13)")
    if "network" in missing:
        why = applied.get("namespace_error") or "no network namespace"
        parts.append(f"cannot cut programs off the network ({why}; and no Landlock ABI 4 for TCP)")
    if "processes" in missing:
        why = applied.get("no_fork_error") or "no seccomp"
        parts.append(f"cannot stop programs from starting processes ({why})")
    if applied.get("error"):
        parts.append(applied["error"])
    text = "; ".join(parts) or _last_error_line(stderr) or "setup failed"
    return (f"the code sandbox is not available on this system: {text}. Run the evaluation on Linux >= 5.13 with "
            "Landlock enabled, or accept running generated code under resource limits only "
            "(--allow-weak-sandbox; Python: Sandbox(require=()))")  # fmt: skip


def describe_isolation(applied: dict) -> str:
    """One line saying what a run was shut in by, for reports."""
    parts = []
    if applied.get("landlock_abi"):
        parts.append(f"Landlock ABI {applied['landlock_abi']}")
    if applied.get("network_namespace"):
        parts.append("network namespace")
    if applied.get("pid_namespace"):
        parts.append("PID namespace")
    if applied.get("no_fork"):
        parts.append("no new processes (seccomp)")
    if applied.get("limits"):
        parts.append("resource limits")
    return ", ".join(parts) or "none"
