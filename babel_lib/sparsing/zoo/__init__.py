"""The micro model family ("zoo"): LLaMA-style ReLU and SiLU models trained for one epoch of a pretraining
corpus (the toy family: the parallel corpus), with the PPL-p% activation ratio (Sparsing Law) measured by the
paper's protocol at log-spaced checkpoints of every run.

One module per idea: `spec` (the family: settings, runs, shapes, seeds, checkpoints, expected cost), `data` (BPE
tokenizer, token streams from either corpus, one epoch of windows), `training` (model with its optimizer,
schedule, loop, saved checkpoints, resume), `protocol` (one c per run from its last checkpoints, and each
checkpoint's own c), `table` (per-run rows, the merged zoo.csv and its provenance), `paths` (where files live).

Three steps, one CLI (`python -m babel_lib.sparsing.zoo prepare|family|train|table|where --profile P`):
- prepare (CPU, once): for `corpus: libreoffice`, train a byte-level BPE on the calibration split and tokenise
  both splits into flat uint16 files under build/zoo-data/<profile>/; for a pretraining corpus, record its shard
  folder and manifest there; with spec.json (the resolved settings). Training reads only that folder (and the
  shards), so a GPU machine with no corpus, `datasets` or model cache can run it.
- train: train some runs (`--runs`), `--jobs` at a time, each for one epoch of distinct windows, saving the
  weights at every checkpoint, then measure the saved series (`protocol`) and write the run's rows; a run is
  finished when its <run>.json is written, and a re-run skips finished runs (a run cut off restarts).
- table: merge the finished runs into the profile's table (`where` prints it: data/zoo/zoo.csv for the
  committed family, build/<profile>/zoo/zoo.csv otherwise) with PROVENANCE.json (commands, code and data
  hashes, commit, machine, versions, times).

Design. Models are LLaMA-style (RMSNorm, RoPE, gated FFN with the activation on the gate as in the paper's
models, no biases, tied embeddings, d_ff = 8/3 width) with ReLU or SiLU; "parameters" counts non-embedding
parameters, as the paper does. The default family has three scales at width/depth 32 and four width/depth
ratios at ~0.2M parameters, 3 seeds each, sized so that one epoch gives every run >= 50 tokens per parameter.
ReLU and SiLU of one shape and seed share initial weights and data order, so they differ only in the
activation. The learning rate is constant after the warmup, so every checkpoint is in the stable phase. As the
paper, one CETT value per run is bisected on the mean perplexity ratio of its last checkpoints and applied to
all; each checkpoint's own bisection is kept beside it. No torch.compile: compiling a dozen shapes would take
longer than most runs train.
"""

from babel_lib.sparsing.zoo.spec import spec_from_profile

__all__ = ["spec_from_profile"]
