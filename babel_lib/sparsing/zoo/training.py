"""Training a zoo run: the model (LLaMA-style, with its optimizer beside it), the schedule (warmup, then the
stable phase), one epoch of distinct windows, the weights saved at every checkpoint, and the PPL-p% protocol
on that saved series (`protocol`); `train` runs the selected runs, several at a time, and resumes."""

from __future__ import annotations

import multiprocessing
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from babel_lib.core.artefacts import atomic_path, params_key, write_json
from babel_lib.errors import BabelError
from babel_lib.sparsing.zoo.data import (
    ZooData,
    batch_indices,
    epoch_order,
    eval_windows,
    load_data,
    run_key,
    sha256_file,
)
from babel_lib.sparsing.zoo.paths import checkpoint_path
from babel_lib.sparsing.zoo.protocol import SharedCett, measure_series
from babel_lib.sparsing.zoo.spec import Run, ZooSpec, checkpoint_steps, estimated_seconds, family, select
from babel_lib.sparsing.zoo.table import is_finished, iso_time, write_rows


def seed_of(run: Run, spec: ZooSpec) -> int:
    """The run's seed: a function of the shape and the seed index only, so ReLU and SiLU of one shape and seed
    share initial weights and data order (they differ only in the activation)."""
    key = {"seed": spec.seed, "width": run.width, "depth": run.depth} | ({"run_seed": run.seed} if run.seed else {})
    return int(params_key(key), 16) % (2**31)


class ZooModel(LlamaForCausalLM):
    """A zoo run's model: LlamaForCausalLM (RMSNorm, RoPE, gated FFN, tied embeddings) that makes its optimizer."""

    def configure_optimizers(self, weight_decay: float, lr: float, device_type: str) -> torch.optim.AdamW:
        """AdamW (betas 0.9/0.95) with weight decay on matrices only (not norms), fused on CUDA."""
        decayed = [p for p in self.parameters() if p.ndim >= 2]
        others = [p for p in self.parameters() if p.ndim < 2]
        return torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                                  {"params": others, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95),
                                 fused=device_type == "cuda")


def build_model(run: Run, spec: ZooSpec, vocab: int) -> ZooModel:
    """A randomly initialised ZooModel for the run, fp32, its weights drawn from the run's seed."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=run.width, intermediate_size=run.d_ff,
                         num_hidden_layers=run.depth, num_attention_heads=run.heads, num_key_value_heads=run.heads,
                         head_dim=spec.head_dim, hidden_act=run.activation, max_position_embeddings=spec.seq_len,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=0, pad_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(run, spec))
        return ZooModel(config).float()


def lr_factor(step: int, spec: ZooSpec) -> float:
    """The multiplier of the peak learning rate at `step` (1-based): linear warmup, then constant (stable)."""
    return min(1.0, step / spec.warmup_steps)


def save_checkpoint(model: nn.Module, path: Path) -> None:
    """The model's weights as safetensors, atomically (tied embeddings stored once)."""
    from safetensors.torch import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_model(model, str(tmp))


def load_checkpoint(run: Run, spec: ZooSpec, vocab: int, path: Path, device: str) -> ZooModel:
    """A run's model with the weights saved at `path`, in float32 for evaluation."""
    from safetensors.torch import load_model

    if not path.exists():
        raise BabelError(f"zoo checkpoint {path} is missing; train the run again (python -m babel_lib.sparsing.zoo train)")
    model = build_model(run, spec, vocab)
    load_model(model, str(path), device="cpu")
    return model.to(device).eval()


def measure(run: Run, spec: ZooSpec, vocab: int, runs: Path, windows: torch.Tensor, device: str
            ) -> tuple[list[dict], SharedCett]:
    """The PPL-p% protocol on a run's saved checkpoint series (`protocol.measure_series`), in float32."""
    models = [(step, load_checkpoint(run, spec, vocab, checkpoint_path(runs, run.name, step), device))
              for step in checkpoint_steps(spec)]
    with torch.no_grad():
        return measure_series(models, windows.to(device), spec.ppl_p, spec.tol, spec.fixed_c_checkpoints,
                              spec.eval_batch)


def machine() -> dict[str, str]:
    """The machine a run used: accelerator (or CPU model), library versions, platform."""
    import transformers

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")] if cpuinfo.exists() else []
        device = f"CPU: {names[0] if names else platform.processor() or platform.machine()}"
    return {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def code_hashes() -> dict[str, str]:
    """sha256 of the modules that define a run's numbers (the zoo package, the sparsity metric)."""
    here = Path(__file__).resolve().parent
    files = {f"zoo/{path.name}": path for path in sorted(here.glob("*.py"))} | {"sparsity.py": here.parent / "sparsity.py"}
    return {name: sha256_file(path) for name, path in files.items()}


def _run_row(run: Run) -> dict[str, Any]:
    return {"run": run.name, "shape": run.shape, "seed": run.seed, "activation": run.activation, "width": run.width,
            "depth": run.depth, "width_depth_ratio": round(run.width_depth_ratio, 4), "d_ff": run.d_ff,
            "heads": run.heads, "params": run.params, "axes": ";".join(run.axes)}


def train_run(run: Run, data: ZooData, out: Path, device: str, command: list[str] | None = None) -> list[dict]:
    """Train one run for one epoch of distinct windows, saving its weights at every checkpoint, then measure the
    saved series with the PPL-p% protocol; writes <run>.csv and, last, <run>.json (the run is finished).

    AdamW (betas 0.9/0.95, weight decay on matrices only), gradient clipping, bf16 autocast on CUDA with fp32
    weights; evaluation in fp32. Training loss is averaged on the device since the previous checkpoint.
    """
    spec, started = data.spec, time.time()
    model = build_model(run, spec, data.vocab).to(device)
    optimizer = model.configure_optimizers(spec.weight_decay, spec.lr, torch.device(device).type)
    stream = data.train.to(device)
    order = epoch_order(data.train, spec, torch.Generator().manual_seed(seed_of(run, spec)))
    checkpoints, trained = set(checkpoint_steps(spec)), {}
    loss_sum, loss_steps = torch.zeros((), device=device), 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    model.train()
    for step in range(1, spec.steps + 1):
        lr = spec.lr * lr_factor(step, spec)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = stream[batch_indices(order[step - 1], spec, device)]
        with autocast:
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        loss_steps += 1
        if step in checkpoints:
            save_checkpoint(model, checkpoint_path(out, run.name, step))
            tokens = step * spec.tokens_per_step
            trained[step] = {"step": step, "tokens": tokens, "tokens_per_param": round(tokens / run.params, 3),
                             "epochs": round(tokens / data.train.numel(), 4), "lr": lr,
                             "train_loss": loss_sum.item() / loss_steps}
            loss_sum.zero_()
            loss_steps = 0
    train_seconds, tick = time.time() - started, time.time()
    del model, optimizer, stream
    points, shared = measure(run, spec, data.vocab, out, eval_windows(data.heldout, spec.eval_windows, spec.seq_len),
                             device)
    rows = [_run_row(run) | trained[point["step"]] | point for point in points]
    write_rows(out / f"{run.name}.csv", rows)
    write_json(out / f"{run.name}.json", {
        "run": run.name, "key": run_key(data.meta), "rows": len(rows), "started": iso_time(started),
        "finished": iso_time(time.time()), "seconds": round(time.time() - started, 2),
        "train_seconds": round(train_seconds, 2), "eval_seconds": round(time.time() - tick, 2),
        "shared_cett": {"cett": shared.cett, "mean_ppl_ratio": shared.mean_ratio, "converged": shared.converged,
                        "bisections": shared.bisections, "steps": list(shared.steps)},
        "machine": machine(), "command": command or sys.argv, "code_sha256": code_hashes(),
        "data": {"tokenizer_sha256": data.meta["tokenizer_sha256"], "corpus_sha256": data.meta["corpus_sha256"],
                 "files": {k: v["sha256"] for k, v in data.meta["files"].items()}}})
    return rows


def _train_worker(directory: Path, name: str, out: Path, command: list[str] | None) -> list[dict]:
    """One job of a parallel `train`, in its own process: load the data and train the run called `name`."""
    data = load_data(directory)
    torch.set_num_threads(data.spec.threads)
    run = next(r for r in family(data.spec) if r.name == name)
    return train_run(run, data, out, data.spec.device, command)


def train(directory: Path, out: Path, patterns: str | None = None, jobs: int = 1,
          command: list[str] | None = None, log=print) -> list[str]:
    """Train the selected runs of the data in `directory` that `out` does not hold finished (resume), `jobs` at
    a time; returns the names of the runs trained, in family order.

    jobs > 1 starts that many worker processes, fed longest run first: micro models leave a GPU mostly idle
    between kernel launches, so several processes on one GPU overlap their launch overheads.
    """
    data = load_data(directory)
    spec = data.spec
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise BabelError("this zoo trains on CUDA and no GPU is visible; run it on a GPU (see `make zoo`) "
                         "or use --profile smoke for the toy family on the CPU")
    if jobs < 1:
        raise BabelError(f"jobs must be at least 1, got {jobs}")
    out.mkdir(parents=True, exist_ok=True)
    key, todo = run_key(data.meta), []
    for run in select(family(spec), patterns):
        if is_finished(run, out, key):
            log(f"{run.name}: finished already, skipped")
        else:
            todo.append(run)

    def report(run: Run, rows: list[dict]) -> None:
        last = rows[-1]
        log(f"{run.name}: {run.params:,} params, {last['tokens']:,} tokens ({last['tokens_per_param']:.1f}/param); "
            f"dense loss {last['dense_loss']:.3f}, activation ratio {last['activation_ratio']:.3f} at the run's CETT "
            f"{last['cett']:.3f} ({last['own_activation_ratio']:.3f} at its own {last['own_cett']:.3f})")

    if jobs == 1:
        for run in todo:
            report(run, train_run(run, data, out, spec.device, command))
    else:
        longest_first = sorted(todo, key=lambda r: -estimated_seconds(r, spec))
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_train_worker, directory, r.name, out, command): r for r in longest_first}
            for future in as_completed(futures):
                report(futures[future], future.result())
    return [r.name for r in todo]
