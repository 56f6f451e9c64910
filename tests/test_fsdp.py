"""Issue 21, FSDP: `compute.distributed: fsdp` trains one run in N processes on a sharded model, and what touches the
sharded model (saving the final and nested-budget adapters, scoring held-out answers, resuming) takes every rank.

What runs on this CPU machine (torch 2.13, accelerate 1.15, transformers 5.23, peft 0.21, bitsandbytes 0.50):
- torch's FSDP1 refuses CPU: `FullyShardedDataParallel(m, device_id=None)` with gloo raises
  "RuntimeError: FSDP needs a non-CPU accelerator device, but no accelerator device is detected."
- accelerate runs no FSDP on CPU: `AcceleratorState` turns `ACCELERATE_USE_FSDP` into `DistributedType.FSDP` only for
  accelerator devices (its MULTI_GPU/MULTI_XPU/... branch); on CPU it stays `MULTI_CPU`, the FSDP plugin is dropped and
  the Trainer runs DDP. So `launch_command` refuses fsdp on CPU (tested in nbs/30_finetune).
- torch's FSDP2 (`fully_shard`) runs on CPU with gloo. The workers below lift accelerate's device gate (the one patch:
  `AcceleratorState` gets `DistributedType.FSDP` and an env-built `FullyShardedDataParallelPlugin` when it would be
  MULTI_CPU) and set accelerate's FSDP variables with FSDP_VERSION=2; everything else is the real stack: the Trainer's
  FSDP path (accelerate's `fsdp2_prepare_model`, peft's auto-wrap policy, `save_fsdp_model` sharded checkpoints) and
  our `finetune`. The workers get exactly the FSDP variables `accelerate launch` exports for the CUDA config
  (configs/accelerate/fsdp_qlora.yaml, FSDP2): the GPU path differs from the tested one only in the device. (peft's
  docs show FSDP1, which refuses CPU; our gather / load go through torch's `get_model_state_dict` /
  `set_model_state_dict`, which serve FSDP1 and FSDP2 alike.)
- 4-bit under FSDP2 on CPU (bitsandbytes' CPU NF4, `bnb_4bit_quant_storage=bfloat16`) runs too: tested below.

Before: the first nested-budget save under FSDP crashed (rank 0 alone called `save_pretrained` on DTensor shards:
"RuntimeError: Attempted to access the data pointer on an invalid python storage."), and nothing chose FSDP."""
import json, os, subprocess, sys, time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from imitation_nb.models import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multiprocess_fixtures import kill_launch, tiny_model_and_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = [0.0004, 0.0008]
# no LoRA dropout: each rank draws its own dropout masks, so with dropout N processes are not one process (DDP alike)
CFG = dict(method="lora", device="cpu", block_size=64, per_device_batch_size=2, grad_accum=2, warmup_steps=0, save_steps=3,
           lr=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0, audit_examples=1, heldout_max_examples=2, heldout_max_length=64, torch_threads=1)

WORKER = '''import os, torch
torch.set_num_threads(1)
import accelerate.state as st
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
_init = st.AcceleratorState.__init__
def init(self, *a, fsdp_plugin=None, **k):       # accelerate 1.15 keeps FSDP off on CPU: lift that gate (see the docstring)
    _init(self, *a, fsdp_plugin=fsdp_plugin, **k)
    if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin or FullyShardedDataParallelPlugin()
st.AcceleratorState.__init__ = init
from imitation_nb.finetune import finetune_worker
finetune_worker()
'''


def accelerate_fsdp_env(config=ROOT / "configs" / "accelerate" / "fsdp_qlora.yaml") -> dict:
    """The FSDP variables `accelerate launch --config_file <config>` exports to its processes (accelerate's own argument
    parsing, validation and `prepare_multi_gpu_env`): the workers below run under exactly the CUDA config's settings.
    Mixed precision is left out: on CPU the run is fp32 (`train_precision`)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env
    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2", "--main_process_port", "29500", "x.py"])
    args, _, _ = _validate_launch_command(args)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}


FSDP_ENV = accelerate_fsdp_env()


def test_the_cuda_fsdp_config_is_the_fsdp2_setup_tested_here():
    "configs/accelerate/fsdp_qlora.yaml asks for FSDP2 with sharded checkpoints and per-block wrapping: what runs below."
    assert {k: FSDP_ENV[k] for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_AUTO_WRAP_POLICY", "FSDP_STATE_DICT_TYPE",
                                      "FSDP_RESHARD_AFTER_FORWARD", "FSDP_CPU_RAM_EFFICIENT_LOADING")} == {
        "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tiny_model_and_data(tmp_path_factory.mktemp("fsdp"))
    (d / "worker.py").write_text(WORKER)
    return d


def fsdp_launch(d, out, wait=True, **cfg):
    "`finetune` in 2 gloo processes under FSDP2 (the worker above); returns the Popen when not `wait`."
    from imitation_nb.finetune import _free_port
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    args = dict(base_spec=str(d / "m"), train_data=str(d / "train.jsonl"), cfg={**CFG, "grad_accum": 1, **cfg}, out_dir=str(out),
                heldout_data=str(d / "held.jsonl"), save_at_budgets_m=BUDGETS)
    (out / "args.json").write_text(json.dumps(args))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(d / "worker.py"), str(out / "args.json")]
    env = {**os.environ, **FSDP_ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = open(out.parent / f"{out.name}.log", "a")
    p = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    if not wait: return p
    assert p.wait(600) == 0, (out.parent / f"{out.name}.log").read_text()[-4000:]
    return json.loads((out / "summary.json").read_text())


def one_process(d, out, **cfg):
    from imitation_nb.finetune import finetune
    return finetune(str(d / "m"), d / "train.jsonl", {**CFG, **cfg}, out, heldout_data=d / "held.jsonl", save_at_budgets_m=BUDGETS)


def load_one_process(d, adapter_dir, **kw):
    "The saved adapter, loaded on one process by `PeftModel.from_pretrained` (the way a user loads it)."
    from peft import PeftModel
    from imitation_nb.models import load_model
    return PeftModel.from_pretrained(load_model(str(d / "m"), device="cpu", **kw), str(adapter_dir))


def rescore(d, adapter_dir, **kw):
    "Held-out loss of a saved adapter, scored on one process (as `finetune` selects and encodes the held-out answers)."
    from imitation_nb.finetune import FinetuneConfig, heldout_loss, encode_conversations
    from imitation_nb.sources import read_conversations
    tok = load_tokenizer(str(d / "m")); convs = read_conversations(d / "held.jsonl")[:CFG["heldout_max_examples"]]
    enc = encode_conversations(tok, convs, None, CFG["heldout_max_length"])
    return heldout_loss(load_one_process(d, adapter_dir, **kw), tok, convs, None, CFG["heldout_max_length"], encoded=enc)["loss"]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    t = tmp_path_factory.mktemp("runs")
    one = one_process(data, t / "one")
    two = fsdp_launch(data, t / "fsdp")
    return t, one, two


def test_fsdp_run_trains_like_one_process_and_saves_normal_adapters(data, runs):
    from safetensors.torch import load_file
    from peft import get_peft_model_state_dict
    t, one, two = runs
    out = t / "fsdp"
    ck = out / "checkpoints" / "checkpoint-3"
    assert (ck / "pytorch_model_fsdp_0").is_dir() and (ck / "optimizer_0").is_dir()    # the Trainer ran FSDP (sharded checkpoints)
    assert two["distributed"] == "fsdp" and one.get("distributed") is None
    assert sorted(json.loads(p.read_text())["rank"] for p in (out / "ranks").glob("rank-*.json")) == [0, 1]
    assert two["steps"] == one["steps"] > 3 and two["trained_tokens"] == one["trained_tokens"]
    assert {k: v["step"] for k, v in two["budgets"].items()} == {k: v["step"] for k, v in one["budgets"].items()}
    assert all(v["saved"] for v in two["budgets"].values())
    for name in ("adapter", "adapters/final", *(f"adapters/{b:g}" for b in BUDGETS)):
        A = load_file(str(out / name / "adapter_model.safetensors"))
        R = load_file(str(t / "one" / name / "adapter_model.safetensors"))
        assert A.keys() == R.keys() and all(A[k].shape == R[k].shape for k in A), name     # whole tensors, not shards
        # one PeftModel on one process loads it, with exactly the saved weights
        m = load_one_process(data, out / name)
        got = get_peft_model_state_dict(m)
        assert got.keys() == A.keys() and all(torch.equal(got[k], A[k]) for k in A), name
        # and the same training as one process (bit for bit here; an unsynchronised or half-saved adapter differs by
        # the whole update, ~lr = 1e-2 per step)
        diff = max((A[k] - R[k]).abs().max().item() for k in A)
        assert diff < 1e-5, (name, diff)
    b0, b1 = (f"{b:g}" for b in BUDGETS)
    A0, A1 = (load_file(str(out / "adapters" / b / "adapter_model.safetensors")) for b in (b0, b1))
    assert any((A0[k] - A1[k]).abs().max() > 1e-3 for k in A0)       # the budgets were saved at their own steps
    assert not list(out.rglob(".*.tmp-*"))


def test_fsdp_heldout_scored_once_on_the_sharded_model(data, runs):
    t, one, two = runs
    out = t / "fsdp"
    held, held1 = (json.loads((p / "heldout.json").read_text()) for p in (out, t / "one"))
    assert set(held) == set(held1) == {"base", *(f"after_{b:g}" for b in BUDGETS)}
    assert two["heldout"].keys() == held.keys()
    assert abs(held["base"]["loss"] - held1["base"]["loss"]) < 1e-4          # the base: adapter disabled on the sharded model
    for b in BUDGETS:   # each budget scored by both ranks on the sharded model = its saved adapter scored on one process
        assert abs(held[f"after_{b:g}"]["loss"] - rescore(data, out / "adapters" / f"{b:g}")) < 1e-4
        assert abs(held[f"after_{b:g}"]["loss"] - held1[f"after_{b:g}"]["loss"]) < 1e-3
    losses = [held[k]["loss"] for k in ("base", *(f"after_{b:g}" for b in BUDGETS))]
    assert min(abs(a - b) for i, a in enumerate(losses) for b in losses[i + 1:]) > 1e-4, losses   # three models scored


def test_fsdp_kill_and_resume(data, runs, tmp_path):
    """Killed (every process) after its first sharded checkpoint, the FSDP run resumes from it on both ranks and ends
    with the adapter of the uninterrupted FSDP run."""
    from safetensors.torch import load_file
    t, _, ref = runs
    out = tmp_path / "killed"
    p = fsdp_launch(data, out, wait=False)
    ck = out / "checkpoints" / "checkpoint-3"
    t0 = time.time()
    while not ((ck / "trainer_state.json").exists() and (ck / "rng_state_1.pth").exists()):
        assert p.poll() is None, "the launch ended before its first checkpoint: " + (tmp_path / "killed.log").read_text()[-3000:]
        assert time.time() - t0 < 600
        time.sleep(0.05)
    kill_launch(p)
    time.sleep(1)
    assert not (out / "adapter").exists() and [c.name for c in (out / "checkpoints").iterdir()] == ["checkpoint-3"]
    s = fsdp_launch(data, out)
    recs = [json.loads(f.read_text()) for f in sorted((out / "ranks").glob("rank-*.json"))]
    assert [r["rank"] for r in recs] == [0, 1] and all(r["resumed_from_step"] == 3 for r in recs), recs
    assert s["steps"] == ref["steps"] and s["resumed_from_step"] == 3
    for name in ("adapter", *(f"adapters/{b:g}" for b in BUDGETS)):
        A, B = (load_file(str(r / name / "adapter_model.safetensors")) for r in (t / "fsdp", out))
        assert A.keys() == B.keys() and max((A[k] - B[k]).abs().max().item() for k in A) < 1e-5, name
    held, held_ref = (json.loads((r / "heldout.json").read_text()) for r in (out, t / "fsdp"))
    assert held.keys() == held_ref.keys() and all(abs(held[k]["loss"] - held_ref[k]["loss"]) < 1e-5 for k in held)


def test_fsdp_qlora_on_cpu(data, tmp_path):
    """4-bit NF4 base (bitsandbytes' CPU backend) with `bnb_4bit_quant_storage=bfloat16` (`placement` under FSDP), sharded
    by FSDP2: the adapter saved by rank 0 loads on one process onto the 4-bit base and scores as the sharded model did."""
    s = fsdp_launch(data, tmp_path / "q", method="qlora")
    assert s["method"] == "qlora" and s["distributed"] == "fsdp"
    held = json.loads((tmp_path / "q" / "heldout.json").read_text())
    b = f"{BUDGETS[-1]:g}"
    m = load_one_process(data, tmp_path / "q" / "adapters" / b, quantization="nf4")
    assert any(type(p).__name__ == "Params4bit" for p in m.parameters())
    assert abs(held[f"after_{b}"]["loss"] - rescore(data, tmp_path / "q" / "adapters" / b, quantization="nf4")) < 1e-3
    assert abs(held[f"after_{b}"]["loss"] - held["base"]["loss"]) > 1e-4


def test_profile_chooses_the_strategy(data, tmp_path):
    """`compute.distributed` is a checked profile key; fsdp on a CPU profile with 2 processes is refused before any
    work, naming the file and the key (accelerate would silently run DDP there)."""
    import yaml
    from imitation_nb.core import ProfileError, load_profile
    from imitation_nb.finetune import run_finetune
    raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    raw["compute"] = {"device": "cpu", "num_gpus": 2, "distributed": "zero3"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ProfileError, match=r"bad\.yaml: key 'compute\.distributed': must be one of \['ddp', 'fsdp'\]"):
        load_profile(str(tmp_path / "bad.yaml"))
    raw["compute"]["distributed"] = "fsdp"; (tmp_path / "cpu_fsdp.yaml").write_text(yaml.safe_dump(raw))
    assert load_profile(str(tmp_path / "cpu_fsdp.yaml")).compute.distributed == "fsdp"
    with pytest.raises(ProfileError, match=r"cpu_fsdp\.yaml: key 'compute\.distributed': .*needs CUDA devices"):
        run_finetune(str(tmp_path / "cpu_fsdp.yaml"), tmp_path / "run", base=str(data / "m"), train_file=data / "train.jsonl")
    assert not (tmp_path / "run").exists()
    raw["compute"] = {"device": "cpu", "num_gpus": 2}; (tmp_path / "dflt.yaml").write_text(yaml.safe_dump(raw))
    assert load_profile(str(tmp_path / "dflt.yaml")).compute.distributed == "ddp"
