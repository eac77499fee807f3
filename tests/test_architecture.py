"""The package's shape (issue 18): the import-graph contracts hold, and importing soberana or the
torch-free entry points changes nothing process-wide and pulls in no torch."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that imports this checkout's soberana, with no
    THP_MEM_ALLOC_ENABLE inherited (unless `env` sets it)."""
    inherited = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    full_env = {**inherited, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_import_linter_contracts_are_kept():
    # .importlinter: ops never imports models/engine, no models <-> ops cycle, engine never
    # imports server/gateway/bench or an HTTP framework, gateway and bench never import
    # engine/models/ops/torch. no_cache: never a stale graph.
    run = _python("import sys; from importlinter.cli import lint_imports; "
                  "sys.exit(lint_imports(config_filename='.importlinter', no_cache=True, "
                  "no_logo=True))")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_gateway_and_bench_import_without_torch():
    run = _python("import sys, soberana.gateway.server, soberana.bench.cli; "
                  "assert 'torch' not in sys.modules, 'torch imported'")
    assert run.returncode == 0, run.stderr


def test_gateway_and_bench_run_on_a_host_without_torch():
    # The bench drives the gateway in front of an OpenAI-compatible endpoint, every process
    # unable to import torch, transformers, matplotlib or redis (CI also runs this script in
    # a fresh venv holding only soberana[gateway,bench]: .ci/torch_free_smoke.sh).
    run = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "torch_free_smoke.py")], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'tests' / 'without_torch'}{os.pathsep}{ROOT}"},
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "8/8 requests through the gateway" in run.stdout


def test_import_soberana_leaves_the_environment_unchanged():
    # THP_MEM_ALLOC_ENABLE and mallopt are the engine-core process's and LLM's opt-in now.
    run = _python("import os; before = dict(os.environ); import soberana, soberana.engine.core; "
                  "changed = {k for k in before.keys() | os.environ.keys() "
                  "if before.get(k) != os.environ.get(k)}; "
                  "assert not changed, sorted(changed)")
    assert run.returncode == 0, run.stderr


def test_tune_process_memory_sets_thp_and_keeps_an_explicit_value():
    code = ("import os; from soberana.engine.process_memory import tune_process_memory; "
            "tune_process_memory(); print(os.environ['THP_MEM_ALLOC_ENABLE'])")
    fresh = _python(code)
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.strip() == "1"
    kept = _python(code, THP_MEM_ALLOC_ENABLE="0")
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.strip() == "0"
