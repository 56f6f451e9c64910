"""Issue 21, item 6: a profile asking for compute.num_gpus: 2 makes the finetune stage launch its training in two
processes itself (here on CPU: torch.distributed.run, gloo), with rank-aware records: one manifest and one set of
result rows (the parent), one adapter and one held-out scoring (rank 0), both ranks trained the same steps, and the
same trained tokens and nested-budget steps as the one-process run (the per-process grad_accum is halved).
Before: no code path launched several processes (num_gpus was ignored: one process trained)."""
import json, os, sys
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from imitation_nb.models import tiny_random_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from multiprocess_fixtures import kill_launch, tiny_model_and_data  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tiny_model_and_data(tmp_path_factory.mktemp("mp"))
    raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    raw["models"] = {"tiny": {"spec": str(d / "m"), "family": "SmolLM2", "params_b": 0.001, "label": "tiny"}}
    raw["grid"]["data_sweep"]["base"] = "tiny"; raw["grid"]["size_sweep"]["bases"] = ["tiny"]
    raw["finetune"].update(method="lora", block_size=64, per_device_batch_size=2, grad_accum=2, warmup_steps=0, save_steps=3,
                           lora_r=4, lora_alpha=8, audit_examples=1, heldout_max_examples=2, heldout_max_length=64,
                           torch_threads=1)
    raw["finetune"].pop("loss_chunk_tokens", None)
    profiles = {}
    for n in (1, 2):
        raw["name"] = f"mp{n}"; raw["compute"] = {"device": "cpu", "num_gpus": n}
        profiles[n] = d / f"mp{n}.yaml"; profiles[n].write_text(yaml.safe_dump(raw, sort_keys=False))
    return d, profiles


def run(setup, n, out):
    from imitation_nb.finetune import run_finetune
    d, profiles = setup
    b = 0.0008
    return run_finetune(str(profiles[n]), out, base="tiny", train_file=d / "train.jsonl", heldout_file=d / "held.jsonl",
                        save_at_budgets_m=[b / 2, b], budget_m=b)


def test_two_processes_train_like_one_and_rank_0_records(setup, tmp_path):
    one, two = run(setup, 1, tmp_path / "one"), run(setup, 2, tmp_path / "two")
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    ranks = sorted(json.loads(p.read_text())["rank"] for p in (two / "ranks").glob("rank-*.json"))
    assert ranks == [0, 1], ranks                                                     # both ranks trained ...
    steps = {json.loads(p.read_text())["steps"] for p in (two / "ranks").glob("rank-*.json")}
    assert steps == {s2["steps"]} and s2["steps"] == s1["steps"] > 1                  # ... the same steps as one process
    assert s2["trained_tokens"] == s1["trained_tokens"]
    assert {k: v["step"] for k, v in s2["budgets"].items()} == {k: v["step"] for k, v in s1["budgets"].items()}
    assert s2["config"]["grad_accum"] == 1 and s1["config"]["grad_accum"] == 2        # the step kept its 4 rows
    assert not (one / "ranks").exists()
    # records written once: one manifest (the parent's), one adapter, held-out scored once, result rows once
    assert [p.name for p in two.glob("manifest*.json")] == ["manifest.json"]
    man = json.loads((two / "manifest.json").read_text())
    assert man["status"] == "done" and man["params"]["config"]["grad_accum"] == 2
    assert s2["distributed"] == "ddp" and s1["distributed"] is None                   # the strategy, recorded
    assert man["extra"]["distributed"] == {"processes": 2, "strategy": "ddp"}
    assert (two / "adapter" / "adapter_model.safetensors").exists() and not list(two.glob(".adapter.tmp-*"))
    held = json.loads((two / "heldout.json").read_text())
    assert set(held) == set(json.loads((one / "heldout.json").read_text()))
    import pandas as pd
    res = pd.read_csv(two / "results.csv")
    assert len(res) == len(pd.read_csv(one / "results.csv")) and (res["metric_key"] == "heldout_loss").all()
    assert abs(held["base"]["loss"] - json.loads((one / "heldout.json").read_text())["base"]["loss"]) < 1e-6


def test_chunked_loss_runs_through_the_ddp_wrapper():
    """modern's chunked LM loss under DDP: the body runs through DDP's forward (which prepares its gradient all-reduce),
    with the same loss and LoRA gradients as the unwrapped model. Before: AttributeError ('DistributedDataParallel'
    has no attribute 'model'), and calling the inner modules directly would have skipped DDP's synchronisation."""
    import socket
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from imitation_nb.finetune import _lm_loss_chunked
    torch.manual_seed(0)
    m = get_peft_model(tiny_random_model("smollm2-135m-instruct"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 1000, (2, 16)); labels = ids.clone(); labels[:, :5] = -100
    inp = {"input_ids": ids, "labels": labels, "position_ids": torch.cat([torch.arange(10), torch.arange(6)])[None].expand(2, -1)}
    ref = _lm_loss_chunked(m, inp, 7); ref.backward()
    g_ref = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        calls = []; ddp.register_forward_hook(lambda *a: calls.append(1))
        got = _lm_loss_chunked(ddp, inp, 7); got.backward()
    finally:
        dist.destroy_process_group()
    assert calls == [1] and abs(got.item() - ref.item()) < 1e-4
    assert g_ref and all(torch.allclose(p.grad, g_ref[n], atol=1e-5) for n, p in m.named_parameters() if n in g_ref)


def test_kill_and_resume_of_a_two_process_run(setup, tmp_path):
    """Killed after its first checkpoint (every process of the launch), the two-process stage run resumes from that
    checkpoint on both ranks and ends with the adapter of an uninterrupted two-process run."""
    import subprocess, sys, time
    from safetensors.torch import load_file
    d, profiles = setup
    ref = run(setup, 2, tmp_path / "ref")
    out = tmp_path / "killed"
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import torch; torch.set_num_threads(1)\n"
              f"from pathlib import Path; from test_gpu_multiprocess import run\n"
              f"run((Path({str(d)!r}), {{2: Path({str(profiles[2])!r})}}), 2, Path({str(out)!r}))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "killed.log", "w")
    p = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True, stdout=log, stderr=log)
    ck = out / "checkpoints" / "checkpoint-3"
    t0 = time.time()
    while not ((ck / "trainer_state.json").exists() and (ck / "rng_state_1.pth").exists()):
        assert p.poll() is None, "the launch ended before its first checkpoint: " + (tmp_path / "killed.log").read_text()[-3000:]
        assert time.time() - t0 < 600
        time.sleep(0.05)
    kill_launch(p); time.sleep(1)                         # every process of the launch (see kill_launch)
    assert not (out / "adapter").exists()                                      # killed before the end
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["checkpoint-3"]
    run(setup, 2, out)                                                         # the stage again: it resumes
    recs = [json.loads(f.read_text()) for f in sorted((out / "ranks").glob("rank-*.json"))]
    assert [r["rank"] for r in recs] == [0, 1] and all(r["resumed_from_step"] == 3 for r in recs), recs
    assert json.loads((out / "summary.json").read_text())["steps"] == json.loads((ref / "summary.json").read_text())["steps"]
    A = load_file(str(ref / "adapter" / "adapter_model.safetensors")); B = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert A.keys() == B.keys() and max((A[k] - B[k]).abs().max().item() for k in A) < 1e-5
