"""``danlu compare`` checks everything before it trains, writes only into ``--out`` (with the
umask's permissions) and ends cleanly on Ctrl-C (issue 15, items 16 and 17).

Each bad value must give exit code 2, one line on stderr naming the argument, no traceback,
nothing written, and no training (``_run`` is the first step after the checks)."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import danlu
from danlu.cli import compare
from danlu.cli.compare import run

# one thread each: the test suite's other worker shares the cores; this checkout's danlu also
# in subprocesses started in another directory
SRC = str(Path(danlu.__file__).resolve().parents[1])
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "COLUMNS": "140",
    "PYTHONPATH": os.pathsep.join([SRC, *filter(None, [os.environ.get("PYTHONPATH")])]),
}


@pytest.fixture
def no_training(monkeypatch):
    def fail(settings):
        raise AssertionError("training started although an argument is bad")

    monkeypatch.setattr(compare, "_run", fail)


def one_line_error(capsys, code, message):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert message in lines[0], lines[0]
    return lines[0]


def test_empty_out_is_refused_and_nothing_is_written_in_the_cwd(
    tmp_path, monkeypatch, capsys, no_training
):
    monkeypatch.chdir(tmp_path)
    for value in ("", "   "):
        line = one_line_error(capsys, run(["--out", value]), "must not be empty")
        assert "--out" in line
    assert list(tmp_path.iterdir()) == []


def test_out_under_an_existing_file_is_refused(tmp_path, capsys, no_training):
    (tmp_path / "file").write_text("x")
    line = one_line_error(
        capsys, run(["--out", str(tmp_path / "file" / "a" / "b")]), "is not a directory"
    )
    assert "--out" in line and "file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_unwritable_out_is_refused_before_training(tmp_path, capsys, no_training):
    # /sys refuses mkdir even to root (chmod-based checks do not work for root)
    line = one_line_error(capsys, run(["--out", "/sys/danlu-compare-test/out"]), "--out")
    assert "cannot write" in line or "not writable" in line
    assert not Path("/sys/danlu-compare-test").exists()


def test_unwritable_out_as_a_normal_user(tmp_path, capsys, no_training):
    if os.geteuid() == 0:
        pytest.skip("root may write into a read-only directory")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    line = one_line_error(capsys, run(["--out", str(locked / "out")]), "not writable")
    assert "--out" in line


def test_created_out_directories_are_removed_when_the_run_is_refused(tmp_path, capsys):
    # a bad argument is found before --out is touched
    out = tmp_path / "a" / "b"
    one_line_error(capsys, run(["--out", str(out), "--seed", "-1"]), ">= 0")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lr", "adamw=1e39"], "in [1e-06, 1]"),
        (["--lr", "lion=1e-300"], "in [1e-06, 1]"),
        (["--lr", "tiger=inf"], "finite number > 0"),
        (["--lr", "amos=nan"], "finite number > 0"),
        (["--seed", "18446744073709551616"], "<= 4294967295"),
        (["--seed", "4294967296"], "<= 4294967295"),
        (["--seed", "-1"], ">= 0"),
        (["--steps", "18446744073709551616"], "<= 1000000"),
    ],
)
def test_out_of_range_numbers(args, message, tmp_path, capsys, no_training):
    out = tmp_path / "out"
    line = one_line_error(capsys, run([*args, "--out", str(out)]), message)
    assert args[0] in line
    assert not out.exists()


def test_largest_seed_and_lr_are_accepted(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(compare, "_run", lambda settings: seen.update(settings))
    code = run(["--seed", "4294967295", "--lr", "adamw=1", "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    assert seen["seed"] == 2**32 - 1 and seen["lr"] == {"adamw": 1.0}


def test_text_that_is_not_a_regular_file(tmp_path, capsys, no_training):
    out = str(tmp_path / "out")
    line = one_line_error(capsys, run(["--text", str(tmp_path), "--out", out]), "is a directory")
    assert "--text" in line
    one_line_error(capsys, run(["--text", "/dev/null", "--out", out]), "not a regular file")


def test_text_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "danlu", "compare", "--task", "charlm", "--text", str(fifo),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "not a regular file" in done.stderr
    assert "--text" in done.stderr
    assert time.monotonic() - start < 120
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_results_follow_the_umask(umask, mode, tmp_path):
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        code = run(["--task", "embedding-drift", "--steps", "2", "--jobs", "1", "--out", str(out)])
    finally:
        os.umask(previous)
    assert code == 0
    files = sorted(out.iterdir())
    assert [p.name for p in files] == ["compare.png", "drift.png", "results.json"]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_writes_into_out_and_nowhere_else(tmp_path):
    """HOME, the working directory and TMPDIR stay empty: matplotlib's config and font cache
    and torch's compile cache go to a temporary directory inside --out, removed at the end."""
    home, cwd, tmp = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmp"
    for d in (home, cwd, tmp):
        d.mkdir()
    env = {k: v for k, v in ENV.items() if not k.startswith(("XDG_", "MPL"))}
    env.update(HOME=str(home), TMPDIR=str(tmp))
    done = subprocess.run(
        [sys.executable, "-m", "danlu", "compare", "--task", "embedding-drift", "accumulation",
         "--steps", "2", "--out", "out"],
        capture_output=True, text=True, timeout=300, env=env, cwd=cwd,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(home.rglob("*")) == []
    assert list(tmp.rglob("*")) == []
    assert [p.name for p in cwd.iterdir()] == ["out"]
    out = cwd / "out"
    assert sorted(p.name for p in out.iterdir()) == ["compare.png", "drift.png", "results.json"]
    json.loads((out / "results.json").read_text())


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it (worker processes
    included): one line, exit code 130, nothing written."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "danlu", "compare", "--task", "charlm", "--jobs", "2",
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the first line is printed when training starts
            if "danlu compare:" in line:
                break
        time.sleep(2.0)  # the workers are importing torch or training
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["danlu compare: interrupted; nothing written"], err
    assert not out.exists()
