"""Convert a loaded model into a fine-grained MoE: partition every layer, keep it as an artefact, check it.

The partition artefact is keyed by the model's fingerprint and the conversion parameters, so later
notebooks find it and a changed model or parameter never reuses a stale one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.batches import Batch
from babel_lib.errors import BabelError
from babel_lib.core.ffn import ffn_layers
from babel_lib.core.hooks import hooked, site
from babel_lib.core.evaluation import lm_logits
from babel_lib.core.models import LoadedModel, run_decoder
from babel_lib.babel.moe import ExpertMap, routed
from babel_lib.babel.partition import check_n_experts, cohesion, partition_labels



def partition_params(lm: LoadedModel, n_experts: int, method: str, seed: int, iters: int) -> dict:
    """The parameters that identify a partition artefact."""
    return {"model": lm.name, "fingerprint": lm.fingerprint, "n_experts": n_experts, "method": method,
            "seed": seed, "iters": iters}


@torch.no_grad()
def coactivation_features(lm: LoadedModel, batches: Iterable[Batch]) -> list[torch.Tensor]:
    """Per layer, the [d_ff, d_ff] co-activation matrix |A|^T |A| over counted tokens (a running sum).

    Row i describes neuron i by how strongly it fires together with every other neuron; balanced k-means
    on these rows groups neurons that co-activate (MoEfication's co-activation graph, as features).
    """
    layers = ffn_layers(lm.model)
    sums = [torch.zeros(f.width, f.width, device=lm.device) for f in layers]
    mask: list[torch.Tensor] = []

    def hook(layer: int):
        def accumulate(a: torch.Tensor) -> None:
            x = a.reshape(-1, a.shape[-1])[mask[0]].abs().float()
            sums[layer].addmm_(x.T, x)
        return accumulate

    with hooked(lm.model, {site(f.index, "mlp.hook_post"): hook(f.index) for f in layers}):
        for batch in batches:
            batch = batch.to(lm.device)
            mask[:] = [batch.count_mask.reshape(-1)]
            lm.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return sums


def partition_model(lm: LoadedModel, n_experts: int, method: str = "kmeans", *, seed: int = 0, iters: int = 30,
                    store: ArtefactStore | None = None, calibration: Iterable[Batch] | None = None) -> ExpertMap:
    """Partition every FFN layer of `lm` into `n_experts` balanced experts (cached in `store` when given)."""
    check_n_experts(n_experts)
    params = partition_params(lm, n_experts, method, seed, iters)

    def compute():
        layers = ffn_layers(lm.model)
        if method == "coactivation":
            if calibration is None:
                raise BabelError("method='coactivation' needs calibration batches (pass calibration=...)")
            rows = coactivation_features(lm, calibration)
        else:
            rows = [f.cluster_rows() for f in layers]
        labels = torch.stack([
            partition_labels(r, n_experts, method, seed=seed + f.index, iters=iters).cpu()
            for f, r in tqdm(list(zip(layers, rows)), desc=f"{lm.name}: {method} partition", leave=False)
        ])
        return {"labels": labels.to(torch.int32)}, {"card": lm.card}

    tensors, _ = store.cached("partition", params, compute) if store else compute()
    experts = ExpertMap(tensors["labels"], n_experts)
    layers = ffn_layers(lm.model)
    experts.check_model(len(layers), layers[0].width)
    return experts


def layer_cohesion(lm: LoadedModel, experts: ExpertMap) -> torch.Tensor:
    """Mean within-expert cosine similarity of the clustered rows, per layer and expert: [n_layers, n_experts]."""
    return torch.stack([cohesion(f.cluster_rows().float(), experts.labels[f.index].to(lm.device)).cpu()
                        for f in ffn_layers(lm.model)])


@torch.no_grad()
def equivalence(lm: LoadedModel, experts: ExpertMap, batches: Iterable[Batch], drop_fraction: float = 0.5,
                seed: int = 0) -> dict[str, float]:
    """Max |logit difference| on counted tokens: converted model with every expert active vs the dense model,
    and, as a control showing the routing is live, with a random `drop_fraction` of each layer's experts dropped.
    The LM head runs on counted tokens only (Gemma's vocabulary is 262k); pass small, length-sorted batches
    (batches.paragraph_batches) to keep padding and memory low.
    """
    g = torch.Generator().manual_seed(seed)
    keep = (torch.rand(experts.n_layers, experts.n_experts, generator=g) >= drop_fraction).float()
    gates = {"all_experts": lambda layer, s: torch.ones(experts.n_experts, device=s.device),
             "dropped": lambda layer, s: keep[layer].to(s.device)}
    result = {"all_experts": 0.0, "dropped": 0.0, "logit_scale": 0.0, "tokens": 0}
    for batch in batches:
        batch = batch.to(lm.device)

        def logits():
            hidden = run_decoder(lm.model, batch.input_ids, batch.attention_mask)
            return lm_logits(lm.model, hidden[batch.count_mask])

        dense = logits()
        result["logit_scale"] = max(result["logit_scale"], dense.abs().max().item())
        result["tokens"] += int(batch.count_mask.sum())
        for name, gate in gates.items():
            with routed(lm.model, experts, gate):
                result[name] = max(result[name], (logits() - dense).abs().max().item())
    if not result["tokens"]:
        raise BabelError("the equivalence check got no text token; give it at least one non-empty paragraph")
    return result
