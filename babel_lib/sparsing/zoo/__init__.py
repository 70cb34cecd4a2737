"""The micro model family ("zoo"): LLaMA-style ReLU and SiLU models trained on the parallel corpus, with the
PPL-p% activation ratio (Sparsing Law) measured at log-spaced checkpoints of every run.

One module per idea: `spec` (the family: settings, runs, shapes, checkpoints, expected cost), `data` (BPE
tokenizer and token streams), `training` (model with its optimizer, WSD schedule, loop, PPL-p% per checkpoint,
resume), `table` (per-run rows, the merged zoo.csv and its provenance), `paths` (where a profile's files live).

Three steps, one CLI (`python -m babel_lib.sparsing.zoo prepare|family|train|table|where --profile P`):
- prepare (CPU, once): train a byte-level BPE on the calibration split and tokenise both splits into flat
  uint16 files under build/zoo-data/<profile>/, with spec.json (the resolved settings). Training reads only
  that folder, so a GPU machine with no corpus, `datasets`, YAML or model cache can run it.
- train: train some runs (`--runs`), `--jobs` at a time, evaluate every checkpoint with `sparsity.ppl_p`, and
  write each run's rows atomically after every checkpoint; a run is finished when its <run>.json is written,
  and a re-run skips finished runs (a run cut off by a time limit restarts from scratch).
- table: merge the finished runs into the profile's table (`where` prints it: data/zoo/zoo.csv for the
  committed family, build/<profile>/zoo/zoo.csv otherwise) with PROVENANCE.json (commands, code and data
  hashes, commit, machine, versions, times).

Design. Models are LLaMA-style (RMSNorm, RoPE, gated FFN with the activation on the gate as in the paper's
models, no biases, tied embeddings, d_ff = 8/3 width) with ReLU or SiLU; "parameters" counts non-embedding
parameters, as the paper does. The default family has three scales at width/depth 32 and four width/depth
ratios at ~4M parameters; every run sees the same tokens (the corpus is small, so several epochs: the held-out
dense loss in the table shows any overfitting). ReLU and SiLU of one shape share initial weights and data order,
so they differ only in the activation. Each checkpoint gets its own PPL-p% bisection (the paper reuses one CETT
value over its last checkpoints), so every row stands alone. No torch.compile: compiling a dozen shapes would
take longer than most runs train.
"""

from babel_lib.sparsing.zoo.spec import spec_from_profile

__all__ = ["spec_from_profile"]
