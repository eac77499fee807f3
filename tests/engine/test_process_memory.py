"""LLM changes the process's allocator settings only when asked (tune_process_memory)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# One fresh interpreter: LLM(tune_process_memory=False) first (nothing may change), then the
# default (THP set, mallopt applied once). The demo model: random weights, built offline.
_CODE = """
import os
from soberana import LLM
from soberana.ops.cpu import kernels as cpu_kernels
kw = dict(device="cpu", max_model_len=256, max_num_batched_tokens=256, kv_cache_gb=0.01)
LLM("demo", tune_process_memory=False, **kw)
# (torch.compile itself exports TORCHINDUCTOR_CACHE_DIR: not ours to check)
assert "THP_MEM_ALLOC_ENABLE" not in os.environ, "THP set"
assert cpu_kernels.keep_freed_memory.cache_info().misses == 0, "mallopt applied"
LLM("demo", **kw)
assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
assert cpu_kernels.keep_freed_memory.cache_info().misses == 1, "mallopt not applied"
print("ok")
"""


def test_llm_tunes_process_memory_only_when_asked():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run([sys.executable, "-c", _CODE], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")
