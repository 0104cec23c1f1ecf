"""Bad input, through the real entry point (``python -m experiments.train``): each mistake ends the process
with exit status 1 and one clear error that names the problem (the config key, the path, the file), no
Python traceback, and no metrics.jsonl / summary.json left behind, since every one of these is found while
composing or building the run, before the first step."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120  # each of these fails at compose/build time in a few seconds
OUR_ERROR = "chuanliu: error:"  # prefix of the one line experiments.trainer.run_training prints


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The subprocesses' environment: caches and wandb under a temporary folder shared by this module (the
    built-in corpus and tokenizer are built once), a single process, no HYDRA_FULL_ERROR."""
    root = tmp_path_factory.mktemp("bad_input_env")
    env = dict(os.environ)
    for name in ("HYDRA_FULL_ERROR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                 "CHUANLIU_RUN_STAMP"):
        env.pop(name, None)
    env.update({
        "CHUANLIU_CACHE": str(root / "cache"),
        "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "WANDB_DIR": str(root / "wandb"),
        "WANDB_CONFIG_DIR": str(root / "wandb_config"), "WANDB_CACHE_DIR": str(root / "wandb_cache"),
    })
    return env


def quoted(value: str | Path) -> str:
    """A path as a quoted Hydra override value (safe for any characters pytest puts in tmp paths)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_train(args: list[str], env: dict[str, str],
              run_dir: Path) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "experiments.train", f"hydra.run.dir={quoted(run_dir)}", "logging=disabled",
           "train.steps=2", "train.device=cpu", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc, time.monotonic() - start


def check_failed_cleanly(proc: subprocess.CompletedProcess, run_dir: Path, *, ours: bool) -> str:
    """Common checks; returns the error text (our one line, or Hydra's message) for specific checks."""
    detail = f"exit {proc.returncode}\n--- stderr:\n{proc.stderr}\n--- stdout (tail):\n{proc.stdout[-2000:]}"
    assert proc.returncode == 1, detail  # 1, not a crash or a kill by signal (negative)
    assert "Traceback" not in proc.stderr, detail
    assert not (run_dir / "metrics.jsonl").exists(), "a build-time error left a metrics.jsonl behind"
    assert not (run_dir / "summary.json").exists(), "a build-time error left a summary.json behind"
    if not ours:  # Hydra refused the command line before our code ran
        assert OUR_ERROR not in proc.stderr, detail
        return proc.stderr
    lines = [line for line in proc.stderr.splitlines() if OUR_ERROR in line]
    assert len(lines) == 1, f"expected exactly one {OUR_ERROR!r} line\n{detail}"
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# data.data_dir: missing, empty, not UTF-8.
# ---------------------------------------------------------------------------------------------------------


def _missing(tmp: Path) -> tuple[Path, list[str]]:  # (data_dir, regexes the error must match)
    path = tmp / "no_such_dir"
    return path, [r"data\.data_dir", re.escape(str(path)), r"does not exist"]


def _empty(tmp: Path) -> tuple[Path, list[str]]:
    path = tmp / "empty"
    path.mkdir()
    (path / "notes.md").write_text("not a .txt file\n", encoding="utf-8")
    return path, [r"data\.data_dir", re.escape(str(path)), r"no \.txt files"]


def _bad_utf8(tmp: Path) -> tuple[Path, list[str]]:
    path = tmp / "latin"
    path.mkdir()
    (path / "good.txt").write_text("一篇好的文章\n", encoding="utf-8")
    bad = path / "bad.txt"
    bad.write_bytes(b"hello\n\nworld \xff\xfe\n")
    return path, [re.escape(str(bad)), r"UTF-8"]


def _too_little(tmp: Path) -> tuple[Path, list[str]]:
    path = tmp / "tiny"
    path.mkdir()
    (path / "a.txt").write_text("abc", encoding="utf-8")  # 3 bytes: it used to train, looping over them
    return path, [r"3 bytes = \d+ tokens", r"less than one training sample", r"train\.seq_len \+ 1 = 129 tokens",
                  re.escape(str(path)) + r"|data\.data_dir"]


DATA_CASES = {"missing": _missing, "empty": _empty, "invalid_utf8": _bad_utf8, "too_little_text": _too_little}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_dir(case: str, env: dict[str, str], tmp_path: Path):
    data_dir, expected = DATA_CASES[case](tmp_path)
    run_dir = tmp_path / "run"
    proc, _ = run_train([f"data.data_dir={quoted(data_dir)}"], env, run_dir)
    message = check_failed_cleanly(proc, run_dir, ours=True)
    for pattern in expected:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


def test_a_tokenizer_smaller_than_requested_is_a_warning_with_the_numbers(env: dict[str, str], tmp_path: Path):
    data = tmp_path / "small_corpus"
    data.mkdir()
    (data / "a.txt").write_text("the cat sat on the mat. " * 40, encoding="utf-8")
    run_dir = tmp_path / "run"
    proc, _ = run_train([f"data.data_dir={quoted(data)}", "data.vocab_size=4096"], env, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr + (run_dir / "train.log").read_text()
    match = re.search(r"data\.vocab_size=4096 was requested but .* supports only (\d+) pieces", out)
    assert match and int(match[1]) < 4096, out[-3000:]


def test_an_unwritable_run_dir_is_one_line_naming_it(env: dict[str, str], tmp_path: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    run_dir = blocker / "run"  # unwritable even for root: its parent is a file
    proc, _ = run_train([], env, run_dir)
    line = check_failed_cleanly(proc, run_dir, ours=True)
    assert re.search(r"cannot write the run directory .*a_file/run \(Not a directory\); set hydra\.run\.dir=", line)


# ---------------------------------------------------------------------------------------------------------
# Bad overrides.
# ---------------------------------------------------------------------------------------------------------

# (override, caught by our code rather than by Hydra, regexes the error must match)
OVERRIDE_CASES = {
    "unknown_model": ("model=gpt5", False,
                      [r"Could not find 'model/gpt5'", r"Available options in 'model'",
                       r"\n\s*baichuan_7b\n", r"\n\s*small\n", r"\n\s*tiny\n"]),
    "bad_value": ("model.n_layers=abc", True, [r"model\.n_layers\b", r"'abc'"]),
    "unknown_key": ("train.stepz=3", False, [r"train\.stepz"]),
    "unknown_key_added": ("+train.stepz=3", True, [r"\bstepz\b", r"TrainConfig|train\.stepz"]),
    "missing_tokenizer": ("data.tokenizer_path=/nonexistent/tok.model", True,
                          [r"data\.tokenizer_path", r"/nonexistent/tok\.model", r"does not exist"]),
    "seq_len_too_long": ("train.seq_len=4096", True, [r"train\.seq_len=4096", r"max_seq_len=128"]),
}


@pytest.mark.parametrize("case", list(OVERRIDE_CASES))
def test_bad_override(case: str, env: dict[str, str], tmp_path: Path):
    override, ours, patterns = OVERRIDE_CASES[case]
    run_dir = tmp_path / "run"
    proc, _ = run_train(["model=tiny", override] if case == "seq_len_too_long" else [override], env, run_dir)
    message = check_failed_cleanly(proc, run_dir, ours=ours)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


# ---------------------------------------------------------------------------------------------------------
# A model too big for the machine.
# ---------------------------------------------------------------------------------------------------------


def test_baichuan_7b_on_cpu_fails_fast_without_allocating(env: dict[str, str], tmp_path: Path):
    from analysis.flops import total_params

    need = 16 * total_params(n_layers=32, dim=4096, ffn_dim=11008, vocab_size=64000)  # fp32 + grads + AdamW
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if have >= need:
        pytest.skip(f"this machine has {have / 2**30:.0f} GiB, enough for Baichuan-7B's "
                    f"{need / 2**30:.0f} GiB")
    run_dir = tmp_path / "run"
    proc, elapsed = run_train(["model=baichuan_7b"], env, run_dir)
    message = check_failed_cleanly(proc, run_dir, ours=True)
    assert elapsed < 60, f"took {elapsed:.0f} s to refuse the model"
    assert re.search(r"\d+ GiB", message) and re.search(r"memory|GiB", message), message
    assert re.search(r"smaller model|model=tiny|model=small", message), message
    assert "baichuan_7b" in message, message
    # Not allocated: 7B fp32 weights alone are 26 GiB. ru_maxrss of RUSAGE_CHILDREN is the largest peak RSS of
    # any child this process has waited for, so it bounds this one's.
    kib = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    max_child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib
    assert max_child_rss < 4 * 2**30, f"a child peaked at {max_child_rss / 2**30:.1f} GiB resident"
