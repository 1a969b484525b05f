"""Run generated Python programs (candidate code + test code) and tell whether the tests ran to their end.

`run_programs` runs each program in its own fresh `python -I -B -u` process, in a fresh temp folder that is its
cwd, HOME and TMPDIR and is deleted afterwards, with stdin at /dev/null, a minimal environment, stdout and
stderr captured to files outside that folder and truncated, a wall-clock timeout after which the whole
process session is killed, and rlimits (address space = `memory_mb`, CPU seconds, 64 MB per written file,
no core files). Programs run in parallel on `workers` threads, one process each; results keep input order.

Completion proof. A program passes only if its code returned normally in the process the harness started.
The child (this file run as a script) reads the program, sets up the sandbox, then runs the code with `exec`
in a fresh `__main__` module. Only when `exec` returns does it read a random nonce (`secrets.token_hex`)
from a pipe the harness filled, and write it to a second pipe; the harness counts a pass only if that pipe
holds exactly the nonce and the process exited with status 0. The nonce is in neither the source, argv
nor the environment, and the child keeps its own references to `os.read`, `os.write` and `os._exit`.
So these do not pass: `sys.exit(0)` / `raise SystemExit` / `os._exit(0)` before the asserts, being killed,
replacing `builtins`, `AssertionError` (the `assert` statement raises the interpreter's own class),
`__import__`, `print`, `sys.exit`, `os._exit` or `atexit`, printing a "passed" marker, closing stdout, and
processes forked by the program (only the original process may write the proof).

Isolation, in two layers:
- Always, an audit hook (`sys.addaudithook`; Python code cannot remove one) refuses sockets, process
  creation (fork, exec, spawn, system, subprocess), signals to other processes, ctypes calls, writing to
  device files other than /dev/null, /dev/zero and the random devices, and opening for writing, creating,
  deleting, renaming or changing attributes of any path outside the temp folder. It sees only what Python
  audits: `_posixsubprocess.fork_exec`, `os.mkfifo`, `os.mknod`, the `dir_fd` argument of `os.open` and
  symlink races get past it.
- Where unprivileged user namespaces work (`sandbox_mode()` is "namespaces", found once per interpreter by a
  probe; otherwise "audit-hook" and only the hook applies), the kernel enforces the same. The child enters
  new user, network, mount and PID namespaces. The network namespace has only a down loopback: no network
  at all. Every mount is remounted read-only, nosuid and nodev, except that the temp folder stays writable
  and the four devices above stay usable, and /proc is a fresh one showing only the sandbox's processes.
  The program runs as PID 1 of its namespace, so when it ends or the harness kills the session, every
  process it started dies too, and it cannot see or signal processes outside. A second, nested user
  namespace then drops the capabilities that could undo the mount flags. RLIMIT_NPROC (`max_processes`)
  counts only the sandbox's own processes, but the kernel does not apply it to root: run the harness as a
  normal user for a process cap below the hook. (In audit-hook mode RLIMIT_NPROC is not set, since there
  it counts every process of the user.)

Not covered (this is a benchmark sandbox, not a security boundary): reading files. A program
can read whatever the user can and print it into its captured output. Memory is limited per process, so
the whole sandbox may use up to `max_processes * memory_mb`. The temp folder can fill the disk at up to
64 MB per file until the timeout. A program written to defeat this harness can forge a pass: it can find
the two pipes (e.g. through /proc/self/fd), copy the nonce across and exit, or poke the child's state
through `gc`, frames or a trace function. The guarantees above are against generated code that misbehaves,
cheats in the obvious ways or is malicious without targeting this file.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

_OUTPUT_LIMIT = 8192  # bytes kept of stdout and of stderr
_FILE_LIMIT = 64 * 2**20  # RLIMIT_FSIZE: largest file a program may write, its captured output included
_SETUP_FAILED = 121  # child exit status when the sandbox itself could not be set up
NAMESPACES, AUDIT_HOOK = "namespaces", "audit-hook"


@dataclass(frozen=True)
class ProgramResult:
    passed: bool  # True only if the program ran to its very end
    status: str  # "passed" | "failed" | "timeout" | "error" (could not start)
    reason: str  # one line, e.g. "AssertionError at line 12", "exited early with status 0"
    stdout: str  # captured, truncated to _OUTPUT_LIMIT bytes
    stderr: str
    duration_s: float


def run_programs(
    programs: Sequence[str],
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    max_processes: int = 32,
    workers: int | None = None,
) -> list[ProgramResult]:
    """Run each complete Python source text in its own sandboxed process; results in input order."""
    mode = sandbox_mode()
    limits = {"timeout_s": timeout_s, "memory_mb": memory_mb, "max_processes": max_processes}
    with ThreadPoolExecutor(max(1, workers or os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda program: _run_one(program, mode, limits), programs))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021 from n samples of which c passed: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1..n} (1 - k/i), which stays exact where the binomials overflow.
    """
    from pkt_bench.api import UserError  # imported here: the child runs this file without the package

    if not 0 <= c <= n or k < 1:
        raise UserError(f"pass@k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise UserError(f"pass@{k} needs at least {k} samples per problem, got {n}; sample more or lower k")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@cache
def sandbox_mode() -> str:
    """NAMESPACES if a probe program runs inside the namespace sandbox on this machine, else AUDIT_HOOK."""
    limits = {"timeout_s": 30.0, "memory_mb": 1024, "max_processes": 32}
    probe = "import os\nassert os.getpid() == 1\nopen('probe', 'w').close()\n"
    return NAMESPACES if _run_one(probe, NAMESPACES, limits).passed else AUDIT_HOOK


# ---- harness side ------------------------------------------------------------------------------------


def _run_one(program: str, mode: str, limits: dict) -> ProgramResult:
    root = tempfile.mkdtemp(prefix="pkt-sandbox-")
    try:
        return _run_in(root, program, mode, limits)
    finally:
        _remove_tree(root)


def _run_in(root: str, program: str, mode: str, limits: dict) -> ProgramResult:
    work = os.path.join(root, "work")
    os.mkdir(work)
    program_path = os.path.join(root, "program.py")
    with open(program_path, "w", encoding="utf-8") as f:
        f.write(program)
    nonce = secrets.token_hex(16).encode()
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    proof_r, proof_w = os.pipe()
    config = dict(limits, mode=mode, work=work, program=program_path, nonce_fd=nonce_r, proof_fd=proof_w)
    # OMP_NUM_THREADS=1: one program per core, and BLAS thread buffers would eat the address-space limit
    env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    timed_out = False
    try:
        with open(os.path.join(root, "stdout"), "wb") as out, open(os.path.join(root, "stderr"), "wb") as err:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", "-u", os.path.abspath(__file__), json.dumps(config)],
                    cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    pass_fds=(nonce_r, proof_w), start_new_session=True,
                )
            except OSError as exc:
                return ProgramResult(False, "error", f"could not start: {exc}", "", "", 0.0)
            finally:
                os.close(nonce_r)
                os.close(proof_w)
            try:
                proc.wait(timeout=limits["timeout_s"])
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_session(proc.pid)
            proc.wait()
        duration = time.monotonic() - start
        os.set_blocking(proof_r, False)
        try:
            proof = os.read(proof_r, 4096)
        except BlockingIOError:
            proof = b""
    finally:
        os.close(proof_r)
    stdout, stderr = (_read_head(os.path.join(root, name)) for name in ("stdout", "stderr"))
    status, reason = _verdict(proof, nonce, proc.returncode, timed_out, limits["timeout_s"])
    return ProgramResult(status == "passed", status, reason, stdout, stderr, duration)


def _verdict(proof: bytes, nonce: bytes, returncode: int, timed_out: bool, timeout_s: float) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"timed out after {timeout_s:g} s"
    if proof == b"pass:" + nonce and returncode == 0:
        return "passed", "ran to its end"
    if returncode == _SETUP_FAILED and proof.startswith(b"error:"):
        return "error", _one_line(proof[6:].decode(errors="replace"))
    if proof.startswith(b"fail:"):
        return "failed", _one_line(proof[5:].decode(errors="replace"))
    if returncode < 0:
        names = {s.value: s.name for s in signal.Signals}
        return "failed", f"killed by signal {-returncode} ({names.get(-returncode, 'unknown')})"
    if proof == b"pass:" + nonce:
        return "failed", f"exited with status {returncode} after its end"
    return "failed", f"exited early with status {returncode}"


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_head(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read(_OUTPUT_LIMIT + 1)
    text = data[:_OUTPUT_LIMIT].decode(errors="replace")
    return text + "\n[... truncated]" if len(data) > _OUTPUT_LIMIT else text


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 300 else line[:300] + "..."


def _remove_tree(root: str) -> None:
    """Delete the run folder even where the program took away its own permissions."""
    for folder, dirs, _ in os.walk(root):
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)
    shutil.rmtree(root, ignore_errors=True)


# ---- child side: this file run as a script -----------------------------------------------------------


def _child_main(config: dict) -> None:
    write, exit_now = os.write, os._exit
    proof_fd = config["proof_fd"]
    try:
        with open(config["program"], encoding="utf-8") as f:
            source = f.read()
        if config["mode"] == NAMESPACES:
            _enter_namespaces(config["work"])
        _set_limits(config)
        import ctypes  # noqa: F401  (loaded before the guard, so `import ctypes` works; its calls are refused)

        sys.addaudithook(_audit_guard(config["work"]))
    except BaseException as exc:
        write(proof_fd, f"error:sandbox setup failed: {exc!r}".encode())
        exit_now(_SETUP_FAILED)
    _run_program(source, config["program"], config["nonce_fd"], proof_fd)


def _run_program(source: str, path: str, nonce_fd: int, proof_fd: int) -> None:
    """Exec the program; write the nonce to the proof pipe only if exec returned, in this same process."""
    import builtins
    import traceback
    import types

    # Own references, taken before the program can replace the originals (in os, sys or builtins).
    read, write, exit_now, getpid = os.read, os.write, os._exit, os.getpid
    any_exception, system_exit = BaseException, SystemExit
    format_exception, stdout, stderr = traceback.format_exception, sys.stdout, sys.stderr
    main = types.ModuleType("__main__")
    main.__file__, main.__builtins__ = path, builtins
    sys.modules["__main__"], sys.argv = main, [path]
    pid = getpid()
    try:
        exec(compile(source, path, "exec"), main.__dict__)
    except any_exception as exc:
        if getpid() != pid:
            exit_now(1)
        try:
            reason = _describe(exc, path, system_exit)
        except any_exception:
            reason = "raised an exception that could not be described"
        try:
            stdout.flush()
            stderr.flush()
            write(2, "".join(format_exception(exc)).encode(errors="replace"))
        except any_exception:
            pass
        write(proof_fd, b"fail:" + reason.encode(errors="replace")[:1000])
        exit_now(1)
    if getpid() != pid:  # a process the program forked got here; only the original may prove completion
        exit_now(0)
    for stream in (stdout, stderr):
        try:
            stream.flush()
        except any_exception:
            pass
    write(proof_fd, b"pass:" + read(nonce_fd, 64))
    exit_now(0)


def _describe(exc: BaseException, path: str, system_exit: type) -> str:
    if isinstance(exc, system_exit):
        code = 0 if exc.code is None else exc.code
        return _one_line(f"exited early with status {code}" if isinstance(code, int) else f"exited early: {code}")
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    if isinstance(exc, SyntaxError) and exc.filename == path:
        line = exc.lineno
    message = str(exc)
    where = f" at line {line}" if line is not None else ""
    return _one_line(f"{type(exc).__name__}{where}" + (f": {message}" if message else ""))


def _set_limits(config: dict) -> None:
    import resource

    cpu = math.ceil(config["timeout_s"]) + 1
    limits = {
        resource.RLIMIT_AS: config["memory_mb"] * 2**20,
        resource.RLIMIT_CPU: cpu,
        resource.RLIMIT_FSIZE: _FILE_LIMIT,
        resource.RLIMIT_CORE: 0,
    }
    if config["mode"] == NAMESPACES:
        limits[resource.RLIMIT_NPROC] = config["max_processes"]
    for kind, value in limits.items():
        resource.setrlimit(kind, (value, value))


# Linux constants (sched.h, mount.h, prctl.h)
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_REC = 1, 2, 4, 8, 32, 4096, 16384
_MS_PRIVATE = 1 << 18
_MOUNT_FLAGS = {  # flags a remount must keep (the kernel refuses to clear them in a user namespace)
    "nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC,
    "noatime": 1 << 10, "nodiratime": 1 << 11, "relatime": 1 << 21, "strictatime": 1 << 24,
}
_PR_SET_PDEATHSIG = 1
_DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")  # the only device files a program may open


def _enter_namespaces(work: str) -> None:
    """Enter new user/net/mount/PID namespaces; returns in PID 1 of the new PID namespace."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")

    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID), "unshare")
    _map_ids(uid, gid)
    child = os.fork()  # the child is PID 1 of the new PID namespace
    if child:
        _relay_exit(child)
    check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
    check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "make mounts private")
    check(libc.mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None), "mount /proc")
    work = os.path.realpath(work)  # as /proc/self/mountinfo spells it
    for path in (work, *filter(os.path.exists, _DEVICES)):  # own mount points, so their flags can differ
        check(libc.mount(os.fsencode(path), os.fsencode(path), None, _MS_BIND, None), f"bind {path}")
    for mount_point, options in _mounts():  # read-only but the folder, no devices but the harmless ones
        flags = _MS_REMOUNT | _MS_BIND | _MS_NOSUID
        flags |= (_MS_RDONLY if mount_point != work else 0) | (_MS_NODEV if mount_point not in _DEVICES else 0)
        for option in options:
            flags |= _MOUNT_FLAGS.get(option, 0)
        check(libc.mount(None, os.fsencode(mount_point), None, flags, None), f"remount {mount_point}")
    os.chdir(work)  # the cwd inherited from before the bind mount still points at the read-only mount
    # A nested user namespace drops the capabilities over the mounts above. It stays without an id map
    # (/proc is read-only now), so ids show as 65534 inside; access checks use the real ids as before.
    check(libc.unshare(_CLONE_NEWUSER), "nested unshare")


def _map_ids(uid: int, gid: int) -> None:
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _mounts() -> list[tuple[str, list[str]]]:
    """(mount point, per-mount options) of every mount, octal escapes in paths decoded."""
    with open("/proc/self/mountinfo") as f:
        fields = [line.split() for line in f]
    unescape = re.compile(r"\\([0-7]{3})")
    return [(unescape.sub(lambda m: chr(int(m[1], 8)), parts[4]), parts[5].split(",")) for parts in fields]


def _relay_exit(child: int) -> None:
    """Outside the PID namespace: wait for its PID 1 and end the same way."""
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status))


_SPAWN_OR_SIGNAL = frozenset({
    "socket.__new__", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
    "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg",
})
# event -> (positions of path arguments, positions of dir_fd arguments); -1 means no dir_fd
_PATH_EVENTS = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
    "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)),
    "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)), "os.truncate": ((0,), ()),
    "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()), "os.chflags": ((0,), ()),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _audit_guard(work: str):
    """An audit hook refusing network, processes, signals, ctypes and changes outside `work`."""
    inside = os.path.realpath(work) + os.sep
    realpath, fspath = os.path.realpath, os.fspath

    def allowed(path) -> bool:
        if isinstance(path, int):
            return False  # fd-based chmod/truncate/... could reach a file opened for reading
        path = realpath(os.fsdecode(fspath(path)))
        if path in _DEVICES:
            return True
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = 0  # not there yet
        return not (stat.S_ISBLK(mode) or stat.S_ISCHR(mode)) and (path + os.sep).startswith(inside)

    def guard(event: str, args: tuple) -> None:
        if event in _SPAWN_OR_SIGNAL or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = any(c in (mode or "") for c in "wax+") or (flags or 0) & _WRITE_FLAGS
            if writes and not isinstance(path, int) and not allowed(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the temp folder is not allowed")
        elif event in _PATH_EVENTS:
            paths, dir_fds = _PATH_EVENTS[event]
            if any(args[i] not in (None, -1) for i in dir_fds if i < len(args)) or not all(
                allowed(args[i]) for i in paths
            ):
                raise PermissionError(f"sandbox: {event}{args!r} outside the temp folder is not allowed")

    return guard


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
