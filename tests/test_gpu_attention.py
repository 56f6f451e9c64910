"""Issue 21, item 3: packed blocks on CUDA go through transformers' documented packed paths (flash_attention_2 on a
flattened batch, else sdpa with per-piece position ids), the CPU-oriented `packed_sdpa` only on CPU. The decision is
a pure function (tested for CUDA here); the sdpa path it picks on a GPU without flash-attn is run here on CPU and
must give the same loss and gradients as `packed_sdpa` (no attention across pieces), for (B, L) rows and for the
flattened batch; flash-attn's varlen boundaries, which it derives from the flattened position ids, are the pieces."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from imitation_nb.finetune import BlockCollator, choose_attention, pack_blocks
from imitation_nb.models import tiny_random_model
from imitation_nb.train_kernels import register_packed_attention


def test_decision():
    assert choose_attention("auto", True, "cpu", True, True) == ("packed_sdpa", False)
    assert choose_attention("auto", True, "cuda", True, True) == ("flash_attention_2", True)
    assert choose_attention("auto", True, "cuda", False, True) == ("sdpa", False)
    assert choose_attention("auto", True, "cuda:3", True, False) == ("sdpa", False)


def rows():
    g = torch.Generator().manual_seed(0)
    ex = []
    for n in (20, 7, 30, 11, 25):
        ids = torch.randint(10, 1000, (n,), generator=g).tolist()
        ex.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return pack_blocks(ex, 32)


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("flatten", [False, True])
def test_sdpa_with_position_ids_is_packed_attention(flatten):
    model = tiny_random_model("smollm2-135m-instruct").train()
    bl = rows()
    assert len(bl) >= 2 and any(r["n_docs"] > 1 for r in bl)
    ref_batch = BlockCollator(0)(bl)
    model.set_attn_implementation(register_packed_attention())
    ref, g_ref = loss_and_grads(model, ref_batch)
    model.set_attn_implementation("sdpa")
    got, g = loss_and_grads(model, BlockCollator(0, flatten=flatten)(bl))
    assert abs(got - ref) < 1e-5, (got, ref)
    assert all(torch.allclose(g[n], g_ref[n], atol=1e-5) for n in g_ref)
    leaky = {**ref_batch, "position_ids": torch.arange(ref_batch["input_ids"].shape[1]).expand_as(ref_batch["input_ids"])}
    assert abs(loss_and_grads(model, leaky)[0] - ref) > 1e-4          # attention across pieces would show


def test_flash_varlen_boundaries_are_the_pieces():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
    bl = rows()
    flat = BlockCollator(0, flatten=True)(bl)
    (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(flat["position_ids"])
    pos = flat["position_ids"][0].tolist()
    starts = [i for i, x in enumerate(pos) if x == 0] + [len(pos)]      # a piece starts where its positions restart
    assert cu_q.tolist() == starts and max_q == max(b - a for a, b in zip(starts, starts[1:]))
