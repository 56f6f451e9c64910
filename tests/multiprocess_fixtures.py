"Shared by tests/test_gpu_multiprocess.py and tests/test_fsdp.py: a tiny model with real data, and killing a launch."
import contextlib
from pathlib import Path

from imitation_nb.core import append_jsonl
from imitation_nb.models import load_tokenizer, tiny_random_model
from imitation_nb.sources import sharegpt_wheel


def tiny_model_and_data(d: Path) -> Path:
    """A tiny random model with SmolLM2's tokenizer in `d/m`, 10 real ShareGPT conversations in `d/train.jsonl`
    (with their order) and 2 held-out ones in `d/held.jsonl`. Returns `d`."""
    tiny_random_model("smollm2-135m-instruct").save_pretrained(d / "m"); load_tokenizer("smollm2-135m-instruct").save_pretrained(d / "m")
    append_jsonl(d / "train.jsonl", [dict(c, order=i) for i, c in enumerate(sharegpt_wheel(10, max_chars=900))])
    append_jsonl(d / "held.jsonl", sharegpt_wheel(2, skip=300, max_chars=800))
    return d


def kill_launch(p):
    """SIGKILL a launch and every process under it: torch.distributed.run starts its workers in sessions of their own, so
    killing the launcher's process group alone leaves them training (and the "resumed" run finds their last checkpoint)."""
    import psutil
    procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    for q in procs:
        with contextlib.suppress(psutil.NoSuchProcess): q.kill()
    p.wait(); psutil.wait_procs(procs, timeout=30)
