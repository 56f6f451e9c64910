"""Issue 21, item 2: the training autocast comes from the requested dtype and the device, not from the first
parameter of the model (which `prepare_model_for_kbit_training` has upcast to fp32). On CPU it stays off unless
asked; asked for (finetune.dtype=bfloat16), a real QLoRA run trains under bf16 autocast. Before: the rule read the
first parameter (fp32) and also required CUDA, so the asked-for bf16 was silently off."""
import json, os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from imitation_nb.core import append_jsonl
from imitation_nb.finetune import finetune
from imitation_nb.models import tiny_random_model, load_tokenizer
from imitation_nb.sources import sharegpt_wheel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinyprec")
    tiny_random_model("smollm2-135m-instruct").save_pretrained(d / "m"); load_tokenizer("smollm2-135m-instruct").save_pretrained(d / "m")
    append_jsonl(d / "train.jsonl", [dict(c, order=i) for i, c in enumerate(sharegpt_wheel(4, max_chars=800))])
    return d


def run(tiny, out, **kw):
    cfg = dict(method="qlora", block_size=64, per_device_batch_size=2, max_steps=2, save_steps=10, audit_examples=1,
               heldout_max_examples=0, lora_r=4, lora_alpha=8, **kw)
    return finetune(str(tiny / "m"), tiny / "train.jsonl", cfg, out)


def test_bf16_asked_on_cpu_trains_under_bf16_autocast(tiny, tmp_path, monkeypatch):
    import transformers
    seen = []
    orig = transformers.Trainer.training_step
    def spy(self, model, inputs, *a, **k):
        seen.append((self.args.bf16, self.accelerator.mixed_precision))
        return orig(self, model, inputs, *a, **k)
    monkeypatch.setattr(transformers.Trainer, "training_step", spy)
    s = run(tiny, tmp_path / "bf16", dtype="bfloat16")
    assert seen and all(x == (True, "bf16") for x in seen), seen    # before: [(False, 'no'), (False, 'no')]
    assert s["mixed_precision"] == "bf16"
    assert s["train_loss"] == s["train_loss"]                       # a number, not NaN


def test_cpu_default_stays_fp32(tiny, tmp_path):
    s = run(tiny, tmp_path / "auto")
    assert s["mixed_precision"] == "no"


def test_decision_ignores_the_upcast_first_parameter(tiny):
    from peft import prepare_model_for_kbit_training
    from imitation_nb.finetune import train_precision
    from imitation_nb.models import load_model
    m = prepare_model_for_kbit_training(load_model(str(tiny / "m"), quantization="nf4", dtype="bfloat16", device="cpu",
                                                   for_training=True))
    assert next(m.parameters()).dtype == torch.float32
    assert train_precision("auto", "cuda:0", bf16_supported=True) == "bf16"
    assert train_precision("auto", "cuda:0", bf16_supported=False) == "no"
    assert train_precision("auto", "cpu", bf16_supported=False) == "no"
