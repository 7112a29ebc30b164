"""The code sandbox against hostile programs: each must fail with its reason, quickly, and leave no trace."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from llamaforge.evaluate.sandbox import (
    ExecResult,
    Sandbox,
    SandboxLimits,
    SandboxUnavailableError,
    _unavailable_message,
    describe_isolation,
)

LIMITS = SandboxLimits(timeout=3.0, cpu_seconds=2.0, memory_bytes=512 << 20, file_bytes=1 << 20)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    """A sandbox that must isolate files, network and processes; skipped where the kernel cannot."""
    box = Sandbox(LIMITS)
    try:
        box.run("pass")
    except SandboxUnavailableError as exc:
        pytest.skip(f"this system cannot isolate programs: {exc}")
    return box


def run(box: Sandbox, source: str) -> ExecResult:
    start = time.perf_counter()
    result = box.run(source)
    assert time.perf_counter() - start < LIMITS.timeout + 5, "the sandbox must never outlive its timeout by much"
    return result


def test_passing_and_failing_programs(sandbox: Sandbox) -> None:
    ok = run(sandbox, "import math\nassert math.isqrt(16) == 4\nprint('fine')")
    assert ok.passed and ok.reason == "passed" and ok.returncode == 0 and ok.stdout == "fine\n"
    bad = run(sandbox, "def f(x):\n    return x + 1\nassert f(1) == 3, 'f is wrong'")
    assert not bad.passed and bad.reason == "exit status 1: AssertionError: f is wrong"
    assert "sandbox_child" not in bad.stderr  # the traceback is the program's own
    assert run(sandbox, "raise SystemExit(3)").reason == "exit status 3"
    assert run(sandbox, "def broken(:\n    pass").reason.startswith("exit status 1: SyntaxError")
    assert run(sandbox, "import threading\nt = threading.Thread(target=print, args=('x',))\nt.start()\nt.join()").passed


def test_infinite_loop_and_sleep_time_out(sandbox: Sandbox) -> None:
    for source in ("while True:\n    pass", "import time\ntime.sleep(60)"):
        result = run(sandbox, source)
        assert not result.passed
        # On an idle machine the loop reaches its CPU limit before the wall clock (SIGXCPU: exit status 152).
        assert (result.reason, result.returncode) in (("timed out after 3 s", None), ("CPU time limit exceeded", 152))


def test_huge_allocations_fail(sandbox: Sandbox) -> None:
    result = run(sandbox, "x = bytearray(64 * 2**30)")
    assert not result.passed and result.reason == "memory limit exceeded (MemoryError)"
    grow = run(sandbox, "chunks = []\nwhile True:\n    chunks.append(bytearray(2**24))")
    assert not grow.passed and grow.reason in ("memory limit exceeded (MemoryError)", "timed out after 3 s")


def test_fork_bomb_is_contained(sandbox: Sandbox) -> None:
    result = run(sandbox, "import os\nwhile True:\n    os.fork()")
    assert not result.passed and "PermissionError" in result.reason
    spawn = run(sandbox, "import subprocess\nsubprocess.run(['/bin/true'])")
    assert not spawn.passed and "PermissionError" in spawn.reason
    assert run(sandbox, "import multiprocessing as mp\nmp.Process(target=print).start()").passed is False


def test_files_outside_the_work_dir_are_out_of_reach(sandbox: Sandbox, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    target = tmp_path / "written-by-sandbox.txt"
    in_home = Path.home() / f".llamaforge-sandbox-test-{os.getpid()}"  # a new file in the user's real home
    try:
        for source in (f"open({str(target)!r}, 'w').write('x')", f"open({str(secret)!r}, 'a').write('x')",
                       f"import os\nos.remove({str(secret)!r})", f"print(open({str(secret)!r}).read())",
                       f"import os\nprint(os.listdir({str(tmp_path)!r}))", f"open({str(in_home)!r}, 'w')",
                       "import os\nos.symlink('/etc/passwd', 'link')\nopen('link', 'a')"):  # fmt: skip
            result = run(sandbox, source)
            assert not result.passed and "PermissionError" in result.reason, (source, result)
        assert not target.exists() and not in_home.exists() and secret.read_text() == "password"
    finally:
        in_home.unlink(missing_ok=True)
    # Its own directory is writable, and removed afterwards.
    own = run(sandbox, "import os\nopen('data.txt', 'w').write('x' * 100)\nprint(os.getcwd())")
    assert own.passed
    assert not Path(own.stdout.strip()).exists()


def test_file_size_and_output_floods_are_cut(sandbox: Sandbox) -> None:
    big = run(sandbox, "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 2**16)")
    assert not big.passed and "File too large" in big.reason
    flood = run(sandbox, "while True:\n    print('y' * 1000)")
    assert not flood.passed and len(flood.stdout) <= 2000


def test_no_network(sandbox: Sandbox) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    accepted: list = []
    server.settimeout(0.2)

    def accept() -> None:
        end = time.time() + 5
        while time.time() < end and not accepted:
            with contextlib.suppress(OSError):  # the accept timeout
                accepted.append(server.accept())

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        for source in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
                       "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)",
                       "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                       "s.sendto(b'x', ('8.8.8.8', 53))",
                       "import socket\ns = socket.socket()\ns.bind(('0.0.0.0', 0))\ns.listen()"):  # fmt: skip
            result = run(sandbox, source)
            assert not result.passed and ("Error" in result.reason), (source, result)
    finally:
        thread.join()
        server.close()
    assert not accepted, "a sandboxed program reached a server of the host"


def test_nothing_inherited(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAFORGE_TEST_SECRET", "hunter2")
    result = run(sandbox, "import os, sys\nprint(sorted(os.environ))\nprint(sys.flags.isolated, sys.flags.no_site)")
    assert result.passed and "LLAMAFORGE_TEST_SECRET" not in result.stdout and "1 1" in result.stdout
    # Nothing of the system's secrets, disks or other processes is readable.
    for path in ("/etc/shadow", "/etc/passwd", f"/proc/{os.getpid()}/environ", f"/proc/{os.getpid()}/cmdline",
                 "/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/mem"):  # fmt: skip
        result = run(sandbox, f"print(open({path!r}, 'rb').read(64))")
        assert not result.passed and ("PermissionError" in result.reason or "FileNotFound" in result.reason), path
    assert run(sandbox, "import time, random\nprint(time.localtime(), random.random())").passed
    # Signals cannot reach this process, nor may the program see it.
    killer = run(sandbox, f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)")
    assert not killer.passed
    assert not run(sandbox, "import os, signal\nos.kill(-1, signal.SIGKILL)").passed


def test_isolation_is_reported(sandbox: Sandbox) -> None:
    run(sandbox, "pass")
    iso = sandbox.isolation
    assert iso["landlock_abi"] >= 1 and iso["limits"] and iso["no_fork"]
    text = describe_isolation(iso)
    assert "Landlock" in text and "seccomp" in text


def test_many_programs_in_parallel(sandbox: Sandbox) -> None:
    sources = [f"assert {i} % 2 == 0" for i in range(6)] + ["while True: pass"]
    seen = []
    start = time.perf_counter()
    results = sandbox.run_many(sources, workers=4, progress=seen.append)
    assert [r.passed for r in results] == [i % 2 == 0 for i in range(6)] + [False]
    assert len(seen) == 7 and time.perf_counter() - start < 3 * LIMITS.timeout


def test_resource_limits_alone_still_stop_runaway_programs() -> None:
    box = Sandbox(SandboxLimits(timeout=2.0, cpu_seconds=1.0, memory_bytes=256 << 20), require=())
    assert box.run("print(1)").passed
    assert not box.run("while True: pass").passed
    assert box.run("x = bytearray(8 * 2**30)").reason == "memory limit exceeded (MemoryError)"


def test_check_fails_early_without_a_python() -> None:
    with pytest.raises(SandboxUnavailableError, match="cannot start the sandbox's Python"):
        Sandbox(python="/nonexistent/python3").check()


def test_bad_limits_and_requirements() -> None:
    with pytest.raises(ValueError, match="timeout must be positive"):
        SandboxLimits(timeout=0)
    with pytest.raises(ValueError, match="unknown sandbox requirement"):
        Sandbox(require=("gpu",))


def test_unavailable_message_names_what_is_missing() -> None:
    text = _unavailable_message({"missing": ["filesystem", "network"], "landlock_abi": 0,
                                 "landlock_error": "Function not implemented",
                                 "namespace_error": "Operation not permitted"}, "")  # fmt: skip
    assert "cannot keep programs out of your files (Function not implemented" in text
    assert "cannot cut programs off the network (Operation not permitted" in text
    assert "--allow-weak-sandbox" in text


def test_sandbox_child_runs_without_llamaforge() -> None:
    """The launcher runs under ``python -I -S``: it may import nothing but the standard library."""
    source = (Path(__file__).parents[2] / "llamaforge" / "evaluate" / "sandbox_child.py").read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= {"__future__", "contextlib", "ctypes", "json", "os", "resource", "sys", "traceback"}
    assert sys.platform != "linux" or "landlock" in source
