"""The command line: bad input is a clear error naming the option; bench never loads torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from soberana.cli import main


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input-len", "0"], "--input-len must satisfy 1 <= LO <= HI"),
        (["--input-len", "9:3"], "--input-len must satisfy 1 <= LO <= HI"),
        (["--output-len", "abc"], "--output-len must be an integer N or a range LO:HI"),
        (["--concurrency", "0"], "--concurrency must be an integer >= 1"),
        (["--request-rate", "-2"], "--request-rate must be a number > 0 or inf"),
        (["--timeout", "inf"], "--timeout must be a number > 0"),
        (["--percentiles", "50,101"], "--percentiles must be in (0, 100]"),
        (["--slo", "latency=5"], "--slo takes KEY=MS pairs with KEY in ttft, tpot, e2e"),
        (["--think-time", "-1"], "--think-time must satisfy 0 <= LO <= HI"),
    ],
)
def test_a_bad_value_is_rejected_with_the_option_and_the_allowed_range(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--extra-body", "[1]"], "--extra-body must be a JSON object"),
        (["--extra-body", "{bad"], "--extra-body must be a JSON object"),
        (
            ["--burstiness", "0.5"],
            "--burstiness shapes open-loop arrivals: it needs --request-rate",
        ),
        (["--sweep", "users=1,2"], "--sweep must be concurrency=C1,C2,... or rate=R1,R2,..."),
        (["--sweep", "concurrency=1,0"], "--sweep concurrency must be an integer >= 1"),
        (["--sweep", "concurrency=1,2", "--request-rate", "3"], "drop --request-rate"),
        (["--workload", "file"], "--workload file needs --dataset-path"),
        (["--request-rate", "inf", "--duration", "5"], "add --num-prompts"),
        (["--base-url", "localhost:8000"], "--base-url must be an http(s) URL"),
    ],
)
def test_inconsistent_options_are_rejected_before_any_request(run_bench, args, message):
    code, out, err = run_bench("--model", "m", *args)
    assert code == 2
    assert message in err and out == ""


def test_help_lists_the_workloads_and_the_compare_mode(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in (
        "--workload",
        "random",
        "prefix",
        "multiturn",
        "file",
        "--sweep",
        "--slo",
        "compare",
    ):
        assert word in out


def test_the_bench_command_never_imports_torch():
    code = (
        "import sys\n"
        "from soberana.cli import main\n"
        "try:\n    main(['bench', '--help'])\nexcept SystemExit:\n    pass\n"
        "import soberana.bench.runner, soberana.bench.compare, soberana.bench.plots\n"
        "import soberana.bench.fake_endpoint\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "ok"
