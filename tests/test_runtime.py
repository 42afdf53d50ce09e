"""Process-level CPU allocator tuning (liptorch.runtime) and its command-line switch."""
import os
import subprocess
import sys

import pytest

import liptorch
from liptorch import runtime
from liptorch.cli import main


def test_tune_cpu_allocator_takes_effect_on_glibc_and_is_idempotent():
    expected = runtime._glibc() is not None
    assert liptorch.tune_cpu_allocator() is expected
    assert liptorch.tune_cpu_allocator() is expected
    assert runtime.cpu_allocator_state() == ("tuned" if expected else "default")


@pytest.mark.parametrize("kwargs", [{"mmap_threshold": 0}, {"trim_threshold": -5}, {"mmap_threshold": 2**31},
                                    {"trim_threshold": 1.5}, {"mmap_threshold": True}])
def test_tune_cpu_allocator_rejects_bad_thresholds(kwargs):
    with pytest.raises(ValueError, match="threshold must be an int"):
        runtime.tune_cpu_allocator(**kwargs)


def _state_after_cli(env_value):
    """What the command line's start-up tuning does in a fresh process with the switch set."""
    code = (
        "from liptorch.runtime import cpu_allocator_state, tune_from_environment; "
        "r = tune_from_environment(); print(cpu_allocator_state(), r)"
    )
    env = dict(os.environ)
    env.pop(runtime.ALLOCATOR_ENV, None)
    if env_value is not None:
        env[runtime.ALLOCATOR_ENV] = env_value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_environment_switch_opts_out_and_rejects_unknown_values():
    glibc = runtime._glibc() is not None
    assert _state_after_cli(None).stdout.split() == (["tuned", "True"] if glibc else ["default", "False"])
    assert _state_after_cli("default").stdout.split() == ["default", "False"]
    bad = _state_after_cli("fast")
    assert bad.returncode != 0 and "must be 'tuned' or 'default'" in bad.stderr


def test_cli_reports_a_bad_allocator_setting_as_one_line(monkeypatch, capsys):
    monkeypatch.setenv(runtime.ALLOCATOR_ENV, "sometimes")
    assert main(["bench", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "LIPTORCH_CPU_ALLOCATOR must be 'tuned' or 'default'" in err


@pytest.mark.parametrize("env_value,expected", [(None, "tuned"), ("default", "default")])
def test_command_line_applies_the_setting_and_the_bench_reports_it(env_value, expected):
    if expected == "tuned" and runtime._glibc() is None:
        pytest.skip("no glibc here: nothing to tune")
    env = dict(os.environ)
    env.pop(runtime.ALLOCATOR_ENV, None)
    if env_value is not None:
        env[runtime.ALLOCATOR_ENV] = env_value
    out = subprocess.run(
        [sys.executable, "-m", "liptorch", "bench", "--batch", "2", "--channels", "4", "--size", "8", "--rounds", "1",
         "--threads", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert f"CPU allocator {expected}" in out.stdout.splitlines()[0]
