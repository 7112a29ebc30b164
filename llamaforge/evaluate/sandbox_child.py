"""The sandboxed side of ``llamaforge.evaluate.sandbox``: run as ``python -I -S sandbox_child.py CONFIG_JSON``.

Standard library only, and imported by nothing: it runs in a fresh interpreter before the untrusted
program. It shuts the process in, in this order:

1. read the program into memory;
2. new user, network and PID namespaces (``unshare``, this process's own ids mapped): no network but a
   downed loopback, no privilege over anything outside, and every process left dies with the namespace;
3. resource limits: CPU seconds, address space, processes, file size, open files, no core dumps;
4. Landlock (Linux >= 5.13): read-only access to the system's programs and libraries and the Python
   standard library (not /etc, /proc or /dev), full access to the work directory only; TCP bind/connect
   denied (ABI >= 4); no signals to, or abstract sockets of, processes outside the sandbox (ABI >= 6);
5. fork: the first child is the namespace's init and only reaps; its child installs a seccomp filter that
   refuses to create processes (threads stay allowed), reports what took effect as one JSON line on the
   parent's status pipe (then closed), and runs the program as ``__main__``; or, when a required
   protection is missing, exits with ``EXIT_SETUP_FAILED`` without running it.

The exit status is the program's (128 + N when signal N killed it).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import sys
import traceback

CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
EXIT_SETUP_FAILED = 125  # the sandbox could not be built as required; the program never ran

# Landlock (include/uapi/linux/landlock.h); the syscall numbers are the same on every architecture.
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ABI1 = (1 << 13) - 1  # execute ... make_sym
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # the ones a file may hold
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6
# Readable: programs and libraries, and the few files and devices a Python program expects. Not /etc (root
# would read /etc/shadow), /proc (other processes' command lines) or /dev as a whole (disks).
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
SYSTEM_FILES = ("/etc/localtime",)
DEVICES = {"/dev/null": True, "/dev/zero": True, "/dev/full": True, "/dev/urandom": False, "/dev/random": False}


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]  # fmt: skip


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _errno_text() -> str:
    return os.strerror(ctypes.get_errno())


def enter_namespaces(libc: ctypes.CDLL) -> dict:
    """New user + network (+ PID) namespaces, with this process's own ids mapped; what succeeded."""
    uid, gid = os.geteuid(), os.getegid()
    pid = libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID) == 0
    if not pid and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        return {"network_namespace": False, "pid_namespace": False, "namespace_error": _errno_text()}
    try:  # ids unmapped in the new namespace could not create files
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError as exc:  # the namespace exists but is unusable: nothing could create a file
        return {"network_namespace": True, "pid_namespace": pid, "error": f"user namespace id mapping: {exc}"}
    return {"network_namespace": True, "pid_namespace": pid}


def set_limits(cfg: dict) -> None:
    cpu = max(1, int(cfg["cpu_seconds"] + 0.999))
    limits = [(resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_CORE, 0, 0),
              (resource.RLIMIT_FSIZE, cfg["file_bytes"], cfg["file_bytes"]),
              (resource.RLIMIT_NOFILE, cfg["open_files"], cfg["open_files"])]  # fmt: skip
    if cfg.get("memory_bytes"):
        limits.append((resource.RLIMIT_AS, cfg["memory_bytes"], cfg["memory_bytes"]))
    if cfg.get("processes") and hasattr(resource, "RLIMIT_NPROC"):
        limits.append((resource.RLIMIT_NPROC, cfg["processes"], cfg["processes"]))
    for which, soft, hard in limits:
        _, old_hard = resource.getrlimit(which)
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(which, (soft, hard))


def landlock(libc: ctypes.CDLL, work_dir: str, read_dirs: list[str]) -> dict:
    """Restrict this process and its children to reading the system and writing `work_dir`; what took effect."""
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    if abi < 1:
        return {"landlock_abi": 0, "landlock_error": _errno_text()}
    fs = FS_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | (FS_IOCTL_DEV if abi >= 5 else 0)
    attr = RulesetAttr(fs, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                       SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)  # fmt: skip
    size = 8 if abi < 4 else 16 if abi < 6 else 24  # the struct grew with the ABI
    ruleset = syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return {"landlock_abi": abi, "landlock_error": f"create_ruleset: {_errno_text()}"}
    read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    rules = [(p, read) for p in read_dirs] + [(p, FS_READ_FILE) for p in SYSTEM_FILES] + [(work_dir, fs)]
    rules += [(dev, (FS_READ_FILE | (FS_WRITE_FILE if writable else 0))) for dev, writable in DEVICES.items()]
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # e.g. no /lib32 on this system
            try:
                if not os.path.isdir(path):
                    access &= FILE_RIGHTS
                rule = PathBeneathAttr(access & fs, fd)
                if syscall(SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                    return {"landlock_abi": abi, "landlock_error": f"add_rule {path}: {_errno_text()}"}
            finally:
                os.close(fd)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return {"landlock_abi": abi, "landlock_error": f"no_new_privs: {_errno_text()}"}
        if syscall(SYS_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) != 0:
            return {"landlock_abi": abi, "landlock_error": f"restrict_self: {_errno_text()}"}
    finally:
        os.close(ruleset)
    return {"landlock_abi": abi}


def wait_status(status: int) -> int:
    """A child's wait status as an exit code: its own, or 128 + the signal that killed it."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1


def run_program(source: str, path: str) -> None:
    """Execute `source` as ``__main__`` in this process and exit with its status (never returns)."""
    code = 0
    try:
        sys.argv = [path]
        sys.path.insert(0, os.path.dirname(path))
        exec(compile(source, path, "exec"), {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException as exc:  # the program's own failure, reported as a traceback without this file's frame
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        traceback.print_exception(type(exc), exc, tb)
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed or full stream must not hide the exit status
                stream.flush()
    os._exit(code & 0xFF)


# seccomp: refuse fork, vfork and clone without CLONE_THREAD (threads stay possible), and clone3 with ENOSYS
# so that the C library falls back to clone; 32-bit and x32 system calls are refused outright.
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
SYSCALLS = {"x86_64": {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435}, "aarch64": {"clone": 220, "clone3": 435}}
CLONE_THREAD, X32_BIT = 0x10000, 0x40000000
EPERM, ENOSYS = 1, 38
LD_W_ABS, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


def no_fork_filter(machine: str) -> list[tuple[int, int, int, int]] | None:
    """The BPF program as (code, jt, jf, k) rows; None on an architecture without a table here."""
    if machine not in SYSCALLS:
        return None
    nr = SYSCALLS[machine]
    allow, eperm, enosys = ("allow",), ("eperm",), ("enosys",)
    rows: list = [(LD_W_ABS, 0, 0, 4), (JEQ_K, 1, 0, AUDIT_ARCH[machine]), eperm, (LD_W_ABS, 0, 0, 0)]
    if machine == "x86_64":
        rows += [(JGE_K, 0, 1, X32_BIT), eperm]
    for name in ("fork", "vfork"):
        if name in nr:
            rows += [(JEQ_K, 0, 1, nr[name]), eperm]
    rows += [(JEQ_K, 0, 1, nr["clone3"]), enosys, (JEQ_K, 1, 0, nr["clone"]), allow]
    rows += [(LD_W_ABS, 0, 0, 16), (JSET_K, 0, 1, CLONE_THREAD), allow, eperm]  # args[0]: the clone flags
    returns = {"allow": RET_ALLOW, "eperm": RET_ERRNO | EPERM, "enosys": RET_ERRNO | ENOSYS}
    return [(RET_K, 0, 0, returns[r[0]]) if len(r) == 1 else r for r in rows]


def forbid_processes(libc: ctypes.CDLL) -> str | None:
    """Install the no-fork seccomp filter on this process; the reason when it cannot."""
    rows = no_fork_filter(os.uname().machine)
    if rows is None:
        return f"no seccomp table for {os.uname().machine}"
    program = (SockFilter * len(rows))(*(SockFilter(*r) for r in rows))
    fprog = SockFprog(len(rows), program)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return f"no_new_privs: {_errno_text()}"
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        return f"seccomp: {_errno_text()}"
    return None


def provides(applied: dict, need: str) -> bool:
    if need == "filesystem":
        return applied.get("landlock_abi", 0) >= 1
    if need == "network":
        return bool(applied.get("network_namespace")) or applied.get("landlock_abi", 0) >= 4
    if need == "processes":
        return bool(applied.get("no_fork")) or bool(applied.get("pid_namespace") and os.geteuid() != 0)
    raise ValueError(f"unknown sandbox requirement {need!r}")


def main() -> None:
    cfg = json.loads(sys.argv[1])
    work_dir, program = cfg["work_dir"], cfg["program"]
    with open(program, encoding="utf-8") as f:
        source = f.read()
    status_fd = cfg["status_fd"]
    applied: dict = {}
    libc = _libc() if sys.platform.startswith("linux") else None
    if libc is not None:
        applied.update(enter_namespaces(libc))
    try:
        set_limits(cfg)
        applied["limits"] = True
    except (OSError, ValueError) as exc:
        applied["limits"] = False
        applied["error"] = f"resource limits: {exc}"
    if libc is not None:
        read_dirs = [*SYSTEM_DIRS, *(p for p in sys.path if p)]
        applied.update(landlock(libc, work_dir, read_dirs))
    os.chdir(work_dir)
    # The first child is the PID namespace's init (signals it has no handler for never reach it, so it
    # only reaps); when it exits, the kernel kills every process left in the namespace.
    init = os.fork()
    if init == 0:
        worker = os.fork()
        if worker == 0:
            error = forbid_processes(libc) if libc is not None else "not Linux"
            applied["no_fork"] = error is None
            if error:
                applied["no_fork_error"] = error
            missing = [need for need in cfg.get("require", ()) if not provides(applied, need)]
            if missing:
                applied["missing"] = missing
            with os.fdopen(status_fd, "w") as status:
                status.write(json.dumps(applied) + "\n")
            if missing or "error" in applied:
                os._exit(EXIT_SETUP_FAILED)
            run_program(source, program)
        os.close(status_fd)
        while True:
            try:
                pid, st = os.waitpid(-1, 0)
            except ChildProcessError:
                os._exit(1)
            if pid == worker:
                os._exit(wait_status(st))
    os.close(status_fd)
    _, st = os.waitpid(init, 0)
    os._exit(wait_status(st))


if __name__ == "__main__":
    main()
