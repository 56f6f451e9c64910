"""Issue 21, item 5: the `gpu-smoke` profile — the whole grid on one GPU with the embedded models (no hub, no API),
through the CUDA code paths. Its dry run works on this CPU machine: the plan (43 stage runs), the compute bill and
the check that every input it names is present; its decisions resolve to the CUDA paths (NF4 QLoRA, bf16 autocast,
packed flash/sdpa attention, paged 8-bit AdamW, vLLM engines sharing the GPU)."""
import os, re, subprocess, sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imitation_nb import reproduce as R
from imitation_nb.core import load_profile
from imitation_nb.models import EMBEDDED

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_validates():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cli = "import sys; from imitation_nb.cli import main; sys.exit(main())"        # = the `imitation-nb` script
    r = subprocess.run([sys.executable, "-c", cli, "reproduce", "--profile", "gpu-smoke", "--dry-run"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "profile 'gpu-smoke'" in out and re.search(r"^43 stage runs", out, re.M), out[:500]
    inputs = out[out.index("inputs named by the profile"):]
    assert "missing" not in inputs and inputs.count("  ok  ") >= 10, inputs
    total = float(re.search(r"^  total\s+([0-9.e+]+) FLOPs", out, re.M).group(1))
    assert 0 < total / 150e12 < 60                       # < 1 min of A100 compute: the run is start-up-bound


def test_offline_and_on_the_cuda_paths():
    import imitation_nb.finetune as F, imitation_nb.generate as G
    prof = load_profile("gpu-smoke")
    assert {m.spec for m in prof.models.values()} <= set(EMBEDDED)                 # no hub
    for s in ("teacher", "judge"):                                                   # no API: loopback servers
        c = prof.section(s)
        assert c.base_url.startswith("http://127.0.0.1:") and c.local_server in EMBEDDED
    assert (prof.compute.device, prof.compute.num_gpus) == ("cuda", 1)
    ft = prof.section("finetune")
    assert ft.method == "qlora" and F._resolve_optim(ft.optim, "cuda") == "paged_adamw_8bit"
    assert F.train_precision(ft.dtype, "cuda", bf16_supported=True) == "bf16"
    assert F.choose_attention(ft.attention, ft.packing, "cuda", True, True) == ("flash_attention_2", True)
    assert F.choose_attention(ft.attention, ft.packing, "cuda", False, True) == ("sdpa", False)
    assert G.choose_backend(prof.section("generate").backend, "cuda", True, True, "llama", True) == ("vllm", "")
    kw = G.vllm_engine_args("/m", context=8192, lora_rank=ft.lora_r, engines=prof.compute.parallel_stages)
    assert kw["max_lora_rank"] == 16 and kw["gpu_memory_utilization"] * prof.compute.parallel_stages <= 0.9
    P = R.plan(prof)
    assert sorted({sp.stage for sp in P}) == sorted({sp.stage for sp in R.plan(load_profile("smoke"))})   # the whole grid
