"""One process of a distributed test (started by test_distributed.py with torchrun's environment, or alone).

python distributed_worker.py results OUT   every heavy pass on a tiny model; torch.save's its results to OUT
python distributed_worker.py fail STORE    profiling where rank 1's hook raises; exits 1 with one error line
"""

from __future__ import annotations

import sys

import torch

from babel_lib.babel.conversion import PartitionParams, partition, partition_model
from babel_lib.babel.profiler import ExpertProfiler, ProfileParams, profile, profile_languages
from babel_lib.core import distributed
from babel_lib.core.batches import windows
from babel_lib.core.evaluation import window_loss
from babel_lib.core.models import load_model
from babel_lib.errors import BabelError
from babel_lib.massive.scan import scan_residuals
from babel_lib.sparsing.sparsity import SparseEvaluator

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "der", "schnelle", "Fuchs", "über"]
TEXTS = {lang: [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5 + (i * 5 + k) % 23))
                for i in range(15)] for k, lang in enumerate(["en", "de", "fr"])}


def results() -> dict:
    lm = load_model("tiny:llama", device="cpu", dtype="float32")
    experts = partition_model(lm, 8, "random", seed=3)
    profile = profile_languages(lm, experts, TEXTS, batch_tokens=96, max_length=40, progress=False)
    ids = windows(lm.tokenizer, [t for ts in TEXTS.values() for t in ts], seq_len=32)
    scan = scan_residuals(lm.model, ids, batch_size=3, top_k=5)
    loss = window_loss(lm.model, ids, batch_size=3, chunk=40)
    sparse = SparseEvaluator(lm, ids, batch_size=3).evaluate("cett", 0.2)
    return {**profile, **{f"scan_{k}": v for k, v in scan.tensors().items()}, "loss_nll": loss.nll,
            "loss_tokens": loss.tokens, "sparse_nll": sparse.loss.nll, "sparse_tokens": sparse.loss.tokens,
            "sparse_ratio": sparse.activation_ratio, "sparse_thresholds": sparse.thresholds,
            "sparse_frequency": torch.cat(sparse.neuron_frequency), "windows": ids.shape[0]}


def fail(root: str) -> None:
    lm = load_model("tiny:llama", device="cpu", dtype="float32")
    part = partition(None, lm, PartitionParams(n_experts=8, method="random", seed=3))
    if distributed.rank() == 1:
        def broken(self, layer, a, mask):
            raise BabelError("a hook on rank 1 met bad input")
        ExpertProfiler._observe = broken
    profile(distributed.RankZeroStore(root), lm, part, ProfileParams(batch_tokens=96, max_length=40), TEXTS,
            split="calibration", progress=False)


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed.init()
    alone = False
    try:
        if sys.argv[1] == "results":
            out = results()
            if distributed.rank() == 0:
                torch.save(out, sys.argv[2])
        else:
            fail(sys.argv[2])
    except BabelError as err:
        alone = not isinstance(err, distributed.RankFailed)
        if alone or distributed.rank() == 0:
            print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        distributed.shutdown(together_ok=not alone)
