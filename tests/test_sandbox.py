"""The code-execution sandbox: hostile programs all fail and change nothing outside; honest ones pass."""

import itertools
import os
import socket
import subprocess
import sys
import textwrap
from math import comb

import pytest
from helpers import tree_digest

from pkt_bench import sandbox
from pkt_bench.api import UserError
from pkt_bench.sandbox import pass_at_k, run_programs


def hostile_programs(victim, port):
    """Hostile programs by name. Attacks whose effect is silent assert it, so a pass would mean they worked."""
    outside = victim.parent
    gone = f"assert not os.path.exists({str(victim)!r})"
    programs = {
        "infinite loop": "while True:\n    pass",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "10 GB allocation": "x = bytearray(10 * 2**30)\nassert len(x) > 0",
        "delete outside file": f"import os\nos.remove({str(victim)!r})",
        "write outside file": f"open({str(victim)!r}, 'w').write('pwned')",
        "append via os.open": f"import os\nos.write(os.open({str(victim)!r}, os.O_WRONLY | os.O_APPEND), b'x')",
        "new file outside": f"open({str(outside / 'new.txt')!r}, 'x').close()",
        "rename outside file": f"import os\nos.rename({str(victim)!r}, 'stolen')",
        "rmtree outside": f"import shutil\nshutil.rmtree({str(outside)!r})",
        "subprocess rm": f"import os, subprocess\nsubprocess.run(['rm', '-f', {str(victim)!r}])\n{gone}",
        "shell via ctypes": f"import os, ctypes\nctypes.CDLL(None).system(b'rm -f {victim}')\n{gone}",
        "write a device": "open('/dev/full', 'w')",
        "network socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')",
        "sys.exit(0) first": "import sys\nsys.exit(0)\nassert False",
        "os._exit(0) first": "import os\nos._exit(0)\nassert False",
        "raise SystemExit": "raise SystemExit\nassert False",
        "kill itself": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\nassert False",
        "kill the harness": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nassert False",
        "replace AssertionError": (
            "import builtins\nclass Quiet(BaseException):\n    pass\nbuiltins.AssertionError = Quiet\nassert 1 == 2"
        ),
        "replace builtins": (
            "import builtins\nbuiltins.__import__ = lambda *a, **k: None\nbuiltins.print = None\n"
            "builtins.BaseException = builtins.SystemExit = object\nassert 1 == 2"
        ),
        "patch exit functions": (
            "import atexit, os, sys\nos._exit = lambda *a: None\nsys.exit = lambda *a: None\n"
            "atexit.register(print, 'passed')\nraise SystemExit(0)\nassert False"
        ),
        "fake success marker": "print('passed')\nprint('pass:' + '0' * 32)\nimport os\nos._exit(0)",
        "write marker to every fd": (
            "import os\nfor fd in range(3, 300):\n    try:\n        os.write(fd, b'pass:' + b'0' * 32)\n"
            "    except OSError:\n        pass\nos._exit(0)"
        ),
        "close stdout": "import os, sys\nsys.stdout.close()\nos.close(1)\nos.close(2)\nassert False",
        "output flood": "while True:\n    print('x' * 10000)",
    }
    return list(programs), list(programs.values())


@pytest.fixture
def listener():
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    yield server
    server.close()


@pytest.fixture(params=[sandbox.NAMESPACES, sandbox.AUDIT_HOOK])
def mode(request, monkeypatch):
    """Both isolation modes: namespaces where this machine has them, and the audit-hook fallback forced."""
    if request.param == sandbox.NAMESPACES and sandbox.sandbox_mode() != sandbox.NAMESPACES:
        pytest.skip("unprivileged user namespaces are not available here")
    monkeypatch.setattr(sandbox, "sandbox_mode", lambda: request.param)
    return request.param


def test_hostile_programs_all_fail_and_change_nothing_outside(tmp_path, listener, mode):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("precious")
    before = tree_digest(tmp_path)
    names, programs = hostile_programs(victim, listener.getsockname()[1])

    results = run_programs(programs, timeout_s=3, workers=2)

    assert [name for name, r in zip(names, results) if r.passed or r.status == "passed"] == []
    assert tree_digest(tmp_path) == before and victim.read_text() == "precious"
    with pytest.raises(BlockingIOError):
        listener.accept()  # no connection ever arrived
    by_name = dict(zip(names, results))
    assert by_name["infinite loop"].status == "timeout"
    assert by_name["sys.exit(0) first"].reason == "exited early with status 0"
    assert by_name["os._exit(0) first"].reason == "exited early with status 0"
    assert by_name["fake success marker"].stdout.startswith("passed")
    for name in ("replace AssertionError", "replace builtins", "close stdout"):
        assert by_name[name].reason.startswith("AssertionError at line"), (name, by_name[name].reason)
    assert len(by_name["output flood"].stdout) < 9000  # truncated
    assert run_programs(["assert 1 + 1 == 2"])[0].passed  # the harness still works afterwards


def test_correct_program_passes_and_failing_assert_fails_with_its_line():
    program = textwrap.dedent("""\
        def add(a, b):
            return a + b


        def check(f):
            assert f(1, 2) == 3
            assert f(2, 2) == 5, 'two and two'


        check(add)
    """)
    good, bad, syntax = run_programs([program.replace("== 5", "== 4"), program, "def f(:\n    pass"])
    assert (good.passed, good.status, good.reason) == (True, "passed", "ran to its end")
    assert (bad.passed, bad.status) == (False, "failed")
    assert bad.reason == "AssertionError at line 7: two and two"
    assert "AssertionError: two and two" in bad.stderr
    assert syntax.status == "failed" and syntax.reason.startswith("SyntaxError at line 1")


def test_results_keep_input_order_and_output_is_captured():
    programs = [f"import time\ntime.sleep({3 - i} / 10)\nprint({i})" for i in range(4)]
    results = run_programs(programs, workers=4)
    assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]
    assert all(r.passed for r in results)


def test_environment_is_minimal_and_the_temp_folder_is_deleted(tmp_path):
    program = textwrap.dedent("""
        import os, sys
        assert os.environ["HOME"] == os.environ["TMPDIR"] == os.getcwd()
        assert sys.stdin.read() == ""
        assert "PKT_SANDBOX_SECRET" not in os.environ
        os.makedirs("locked/inner")
        os.chmod("locked", 0)
        print(os.getcwd())
    """)
    os.environ["PKT_SANDBOX_SECRET"] = "x"
    try:
        (result,) = run_programs([program])
    finally:
        del os.environ["PKT_SANDBOX_SECRET"]
    assert result.passed, result
    assert not os.path.exists(result.stdout.strip())


@pytest.mark.skipif(sandbox.sandbox_mode() != sandbox.NAMESPACES, reason="no unprivileged user namespaces here")
def test_the_namespace_layer_holds_without_the_audit_hook(tmp_path, listener):
    """Code that gets past the hook (here: none installed) still cannot write outside, connect or signal."""
    work = tmp_path / "work"
    work.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    port = listener.getsockname()[1]
    attack = textwrap.dedent(f"""
        import os, socket, sys
        from pkt_bench import sandbox
        sandbox._enter_namespaces({str(work)!r})
        os.system("mount -o remount,rw,bind / 2>/dev/null; rm -f {victim}; echo pwned > {tmp_path}/new.txt")
        assert os.getpid() == 1
        try:
            open("/dev/full", "w")
            sys.exit("opened a device")
        except PermissionError:
            open("/dev/null", "w").write("fine")
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=1)
            sys.exit("connected")
        except OSError:
            pass
        try:
            os.kill({os.getpid()}, 9)
        except ProcessLookupError:
            pass
        open("inside.txt", "w").write("ok")
    """)
    done = subprocess.run([sys.executable, "-c", attack], cwd=work, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt", "work"]
    assert (work / "inside.txt").read_text() == "ok"
    with pytest.raises(BlockingIOError):
        listener.accept()


def test_pass_at_k_matches_hand_values_and_the_combinatorial_definition():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 4, 2) == 1.0  # k > n - c: every k-subset holds a correct sample
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(200, 200, 100) == 1.0
    for n, c, k in [(5, 2, 2), (6, 1, 3), (7, 3, 4), (8, 5, 1), (10, 4, 5)]:
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(samples, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    with pytest.raises(UserError, match="at least 10 samples"):
        pass_at_k(5, 1, 10)
