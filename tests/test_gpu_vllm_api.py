"""Issue 21: our calls into vLLM checked against the real vLLM release pinned in `[gpu]` (vllm==0.33.0), where it is
installed. This CPU machine's CI has no vLLM (it needs CUDA to run), so there the module is skipped and
tests/test_gpu_vllm.py checks the same code path with vLLM's classes stood in at the boundary; this file checks that
the stand-in's boundary is vLLM's: every engine argument we pass is a field of `vllm.EngineArgs`, the sampling
parameters we build construct (`SamplingParams`, with prompt log-probs for MMLU), `LoRARequest` takes the adapter
path where we read it, `LLM.generate` takes `lora_request` and `use_tqdm`, and the outputs have the fields we read.
Measured in a venv with vllm 0.33.0, torch 2.14.0, transformers 5.20.2 (docs/measurements/2026-12-05-vllm-versions.md)."""
import dataclasses, inspect

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[gpu]' on a CUDA machine)")

from imitation_nb.generate import vllm_engine_args


def test_engine_arguments_are_vllm_engine_args_fields(tmp_path):
    from vllm.engine.arg_utils import EngineArgs
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    kw = vllm_engine_args(str(tmp_path), dtype="bfloat16", context=1024, lora_rank=16, seed=3, engines=2)
    assert set(kw) <= fields, sorted(set(kw) - fields)
    assert {"max_model_len", "max_lora_rank", "enable_lora", "gpu_memory_utilization"} <= set(kw)


def test_sampling_parameters_we_build_construct():
    from vllm import SamplingParams
    sp = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=8, stop=["\n\n"], seed=0)      # _gen_vllm, greedy
    assert (sp.max_tokens, sp.stop) == (8, ["\n\n"])
    lp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)                    # MMLU by prompt log-probs
    assert lp.prompt_logprobs == 0


def test_lora_request_and_generate_signature():
    from vllm import LLM
    from vllm.lora.request import LoRARequest
    r = LoRARequest("adapter", 1, "/some/adapter")
    assert r.lora_path == "/some/adapter"
    params = inspect.signature(LLM.generate).parameters
    assert {"lora_request", "use_tqdm"} <= set(params), list(params)


def test_outputs_have_the_fields_we_read():
    from vllm.outputs import CompletionOutput, RequestOutput
    names = {f.name for f in dataclasses.fields(CompletionOutput)}
    assert {"text", "token_ids", "finish_reason"} <= names, names
    assert "prompt_logprobs" in inspect.signature(RequestOutput.__init__).parameters
