"""The micro model family: its definition, data preparation, training, resume and the table."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from babel_lib.sparsing.zoo import data as zoo_data
from babel_lib.sparsing.zoo import paths
from babel_lib.sparsing.zoo import spec as zoo_spec
from babel_lib.sparsing.zoo import table as zoo_table
from babel_lib.sparsing.zoo import training as zoo_training
from babel_lib.errors import BabelError
from babel_lib.sparsing.sparsity import cett_thresholds, ppl_p


def small_spec(**changes) -> zoo_spec.ZooSpec:
    """The smoke zoo cut down to seconds: two languages, 40 paragraphs, 24 steps, 8 checkpoints."""
    spec = dataclasses.replace(
        zoo_spec.spec_from_profile("smoke"), languages=("en", "ja"), paragraphs=40, vocab_size=300, seq_len=32,
        scale_shapes=((8, 1), (16, 2), (24, 3)), ratio_shapes=((8, 2), (16, 2), (32, 1)), steps=24, batch_size=4,
        first_checkpoint=2, checkpoints=8, eval_windows=4, eval_batch=4, lr=1e-2, seeds=1, min_tokens_per_param=0.1,
        fixed_c_checkpoints=5)
    return dataclasses.replace(spec, **changes)


pytestmark = pytest.mark.usefixtures("one_thread")  # micro problems: two threads on 2 shared cores are slower


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return zoo_data.prepare(small_spec(), tmp_path_factory.mktemp("zoo-data"))


@pytest.fixture(scope="module")
def data(data_dir):
    return zoo_data.load_data(data_dir)


# --- the family -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["default", "smoke", "gpu"])
def test_profiles_define_scales_and_ratios_for_relu_and_silu(profile):
    spec = zoo_spec.spec_from_profile(profile)
    runs = zoo_spec.family(spec)
    assert spec.activations == ("relu", "silu") and len(zoo_spec.checkpoint_steps(spec)) >= 6
    assert len({r.name for r in runs}) == len(runs) == 2 * spec.seeds * len(set(spec.scale_shapes + spec.ratio_shapes))
    assert spec.seeds >= 2  # a spread across seeds
    relu = [r for r in runs if r.activation == "relu" and r.seed == 0]
    scale = sorted((r for r in relu if "scale" in r.axes), key=lambda r: r.params)
    ratio = [r for r in relu if "ratio" in r.axes]
    assert len(scale) >= 3 and len({r.width_depth_ratio for r in scale}) == 1
    assert scale[-1].params >= 4 * scale[0].params  # a real range of scales
    assert len({r.width_depth_ratio for r in ratio}) >= 3
    median = sorted(r.params for r in ratio)[len(ratio) // 2]
    assert all(abs(r.params / median - 1) < 0.25 for r in ratio)  # about one parameter count


def test_default_and_gpu_zoo_are_the_same_family():
    assert zoo_spec.spec_from_profile("default") == zoo_spec.spec_from_profile("gpu")  # both write data/zoo


def test_the_committed_family_follows_the_protocol():
    """Issue 13: >= 50 tokens per parameter in one epoch, 3 seeds, >= 10k held-out tokens, c from the last five."""
    spec = zoo_spec.spec_from_profile("default")
    assert spec.seeds == 3 and spec.fixed_c_checkpoints == 5 and spec.eval_windows * spec.seq_len >= 10_000
    assert all(spec.tokens >= 50 * r.params for r in zoo_spec.family(spec))
    assert min(zoo_spec.checkpoint_steps(spec)) > spec.warmup_steps


def test_too_few_tokens_per_parameter_is_refused():
    with pytest.raises(BabelError, match="fewer than min_tokens_per_param=50 tokens per parameter: relu-w8-d1-s0"):
        zoo_spec.make_spec(dataclasses.asdict(small_spec(min_tokens_per_param=50)))


@pytest.mark.parametrize("profile", ["default", "smoke"])
def test_parameter_counts_match_the_built_models(profile):
    spec = zoo_spec.spec_from_profile(profile)
    for run in zoo_spec.family(spec):
        with torch.device("meta"):
            model = zoo_training.build_model(run, spec, vocab=spec.vocab_size)
        counted = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: the head is the embedding
        assert counted == run.params, run.name
        layer = model.model.layers[0]
        assert layer.mlp.gate_proj.out_features == run.d_ff and run.d_ff % spec.ffn_multiple == 0
        assert run.d_ff >= 8 * run.width / 3 > run.d_ff - spec.ffn_multiple
        x = torch.linspace(-3, 3, 13)
        assert torch.allclose(layer.mlp.act_fn(x), getattr(F, run.activation)(x))
        assert len(model.model.layers) == run.depth and model.config.num_attention_heads * spec.head_dim == run.width


def test_relu_and_silu_of_one_shape_and_seed_start_from_the_same_weights():
    spec = small_spec(seeds=2)
    runs = [r for r in zoo_spec.family(spec) if r.width == 16 and r.depth == 2]
    assert [r.name for r in runs] == ["relu-w16-d2-s0", "relu-w16-d2-s1", "silu-w16-d2-s0", "silu-w16-d2-s1"]
    weights = {r.name: zoo_training.build_model(r, spec, 300).state_dict() for r in runs}
    for seed in ("s0", "s1"):
        a, b = weights[f"relu-w16-d2-{seed}"], weights[f"silu-w16-d2-{seed}"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    key = "model.embed_tokens.weight"
    assert not torch.equal(weights["relu-w16-d2-s0"][key], weights["relu-w16-d2-s1"][key])  # seeds differ
    other = zoo_training.build_model(zoo_spec.family(spec)[0], spec, 300).state_dict()
    assert not torch.equal(other[key][:, :8], weights["relu-w16-d2-s0"][key][:, :8])


def test_checkpoints_lie_in_the_stable_phase_of_the_schedule():
    spec = small_spec(steps=2000, first_checkpoint=125, checkpoints=12, warmup=0.05)
    steps = zoo_spec.checkpoint_steps(spec)
    assert len(steps) == 12 and steps[0] == 125 and steps[-1] == 2000
    gaps = np.diff(np.log(steps))
    assert np.allclose(gaps, math.log(2000 / 125) / 11, atol=0.03)  # log-spaced
    lr = [zoo_training.lr_factor(s, spec) for s in range(1, 2001)]
    assert lr[:100] == pytest.approx([s / 100 for s in range(1, 101)])  # linear warmup over 5 %
    assert set(lr[99:]) == {1.0}  # stable to the end: no decay before or between checkpoints
    with pytest.raises(BabelError, match="stable phase"):
        zoo_spec.checkpoint_steps(small_spec(steps=2000, first_checkpoint=100, checkpoints=12, warmup=0.05))
    with pytest.raises(BabelError, match="collide"):
        zoo_spec.checkpoint_steps(small_spec(steps=10, first_checkpoint=2, checkpoints=8))


def test_bad_settings_are_rejected():
    values = dataclasses.asdict(small_spec())
    with pytest.raises(BabelError, match=r"unknown \['widths'\]"):
        zoo_spec.make_spec(values | {"widths": [1]})
    with pytest.raises(BabelError, match="divisible by head_dim"):
        zoo_spec.make_spec(values | {"scale_shapes": [[12, 1]]})
    with pytest.raises(BabelError, match="ratio_shapes is empty"):
        zoo_spec.make_spec(values | {"ratio_shapes": None})
    with pytest.raises(BabelError, match="not supported"):
        zoo_spec.make_spec(values | {"activations": ["gelu"]})
    with pytest.raises(BabelError, match="fixed_c_checkpoints"):
        zoo_spec.make_spec(values | {"fixed_c_checkpoints": 9})


def test_runs_are_selected_by_name_patterns():
    runs = zoo_spec.family(zoo_spec.spec_from_profile("default"))
    assert [r.name for r in zoo_spec.select(runs, "silu-*,relu-w96-d4-s1")] == ["relu-w96-d4-s1"] + [
        r.name for r in runs if r.activation == "silu"]
    assert zoo_spec.select(runs) == runs
    with pytest.raises(BabelError, match="no zoo run matches"):
        zoo_spec.select(runs, "gelu-*")


# --- data --------------------------------------------------------------------------------------------------


def test_token_stream_round_trips_every_paragraph():
    texts = {"en": ["Click OK.", "Choose Tools - Options."], "ja": ["[OK] をクリックします。", "ツール"]}
    tokenizer = zoo_data.train_tokenizer([t for v in texts.values() for t in v], 280)
    stream, spans = zoo_data.token_stream(tokenizer, texts)
    eos = tokenizer.token_to_id(zoo_data.EOS)
    assert stream.dtype == np.uint16 and eos == 0
    for code, (start, end) in spans.items():
        ids = stream[start:end].tolist()
        assert ids[-1] == eos and ids.count(eos) == len(texts[code])
        pieces, current = [], []
        for i in ids:
            if i == eos:
                pieces.append(tokenizer.decode(current))
                current = []
            else:
                current.append(i)
        assert pieces == texts[code]
    assert spans["en"][1] == spans["ja"][0] and spans["ja"][1] == stream.size


def test_prepare_is_deterministic_and_skips_when_up_to_date(data_dir, tmp_path):
    meta = json.loads((data_dir / "spec.json").read_text())
    again = zoo_data.prepare(small_spec(), tmp_path)
    other = json.loads((again / "spec.json").read_text())
    assert other["files"] == meta["files"] and other["tokenizer_sha256"] == meta["tokenizer_sha256"]
    assert meta["files"]["train"]["paragraphs"] == meta["files"]["heldout"]["paragraphs"] == 40
    stamp = (again / "train.npy").stat().st_mtime_ns
    zoo_data.prepare(small_spec(), tmp_path)
    assert (again / "train.npy").stat().st_mtime_ns == stamp
    (again / "train.npy").write_bytes(b"x")
    with pytest.raises(BabelError, match="missing or changed"):
        zoo_data.load_data(again)


def test_windows_come_from_the_streams(data):
    spec = data.spec
    windows = zoo_data.eval_windows(data.heldout, 5, spec.seq_len)
    starts = np.linspace(0, data.heldout.numel() - spec.seq_len, 5).round().astype(int)
    assert starts[-1] == data.heldout.numel() - spec.seq_len and windows.shape == (5, spec.seq_len)
    for row, start in zip(windows, starts):
        assert torch.equal(row, data.heldout[start : start + spec.seq_len])
    order = zoo_data.epoch_order(data.train, spec, torch.Generator().manual_seed(1))
    assert order.shape == (spec.steps, spec.batch_size)
    assert torch.equal(order, zoo_data.epoch_order(data.train, spec, torch.Generator().manual_seed(1)))
    index = zoo_data.batch_indices(order[0], spec, "cpu")
    assert index.shape == (spec.batch_size, spec.seq_len + 1) and int(index.max()) < data.train.numel()
    assert (torch.diff(index, dim=1) == 1).all() and (index[:, 0] % spec.seq_len == 0).all()


def test_an_epoch_too_short_for_the_run_is_refused(data):
    spec = dataclasses.replace(data.spec, steps=data.train.numel() // (data.spec.batch_size * data.spec.seq_len) + 1)
    with pytest.raises(BabelError, match="one epoch of .* training windows .* cannot feed"):
        zoo_data.epoch_order(data.train, spec, torch.Generator())


def test_a_pretraining_shard_folder_feeds_the_zoo(tmp_path, monkeypatch):
    """The seam to the pretraining corpus: its reader's splits (here a stand-in for babel_lib.data.pretrain) of
    the shards present in the folder become the zoo's streams, checked against the manifest recorded at prepare."""
    import sys
    import types

    folder = tmp_path / "shards"
    folder.mkdir()
    splits = {"train": np.arange(4000, dtype=np.uint16) % 300, "heldout": np.arange(900, dtype=np.uint16) % 290}
    manifest = {"tokenizer": {"vocab": 300, "eos_id": 0, "sha256": "t" * 64}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    reader = types.ModuleType("babel_lib.data.pretrain")
    reader.present_shards = lambda where, split: [f"{split}-000.u16.xz"]
    reader.load_tokens = lambda where, split, shards: splits[split] if shards == [f"{split}-000.u16.xz"] else None
    monkeypatch.setitem(sys.modules, "babel_lib.data.pretrain", reader)
    monkeypatch.setattr(zoo_data, "ROOT", tmp_path)
    out = zoo_data.prepare(small_spec(corpus="shards"), tmp_path / "data")
    meta = json.loads((out / "spec.json").read_text())
    assert meta["files"]["train"]["files"] == ["train-000.u16.xz"] and meta["files"]["heldout"]["tokens"] == 900
    assert meta["tokenizer_sha256"] == "t" * 64 and meta["vocab"] == 300
    data = zoo_data.load_data(out)
    assert torch.equal(data.train, torch.from_numpy(splits["train"].astype(np.int64)))
    assert torch.equal(data.heldout, torch.from_numpy(splits["heldout"].astype(np.int64)))
    (folder / "manifest.json").write_text(json.dumps(manifest | {"rebuilt": True}))
    with pytest.raises(BabelError, match="pretraining shards shards are missing or changed"):
        zoo_data.load_data(out)
    with pytest.raises(BabelError, match="has 300 tokens but zoo vocab_size is 512"):
        zoo_data.prepare(small_spec(corpus="shards", vocab_size=512), tmp_path / "other")


# --- training, measuring, resuming, the table ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """Two runs of one shape and seed trained side by side (two processes), with their saved checkpoints."""
    out = tmp_path_factory.mktemp("runs")
    command = ["python", "-m", "babel_lib.sparsing.zoo", "train"]
    names = zoo_training.train(data_dir, out, "relu-w16-d2-s0,silu-w16-d2-s0", jobs=2, command=command,
                               log=lambda _: None)
    return out, names, command


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _by_hand_at(model, windows: torch.Tensor, c: float) -> tuple[float, float, float]:
    """Dense loss, sparse loss and activation ratio at CETT value c, applied by hand: per-layer thresholds from one
    dense pass (cett_thresholds, checked against the definition in test_sparsity), then h_i zeroed before each
    down projection where |h_i|·‖W_out[:, i]‖ < t_l, kept (token, neuron) pairs counted, the loss from the logits."""
    def loss(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1)).item()

    with torch.no_grad():
        dense = loss(model(input_ids=windows).logits)
        thresholds = cett_thresholds(model, windows, c)
        kept = []

        def zero_small(layer):
            def hook(module, args):
                norms = args[0].abs() * module.weight.norm(dim=0)  # down_proj.weight is [width, d_ff]
                keep = norms >= thresholds[layer]
                kept.append(keep.double().mean().item())
                return (args[0] * keep,)
            return hook

        handles = [block.mlp.down_proj.register_forward_pre_hook(zero_small(i))
                   for i, block in enumerate(model.model.layers)]
        try:
            sparse = loss(model(input_ids=windows).logits)
        finally:
            for handle in handles:
                handle.remove()
    return dense, sparse, sum(kept) / len(kept)


def test_fixed_c_equals_a_by_hand_recomputation_on_the_saved_checkpoints(trained, data):
    """The paper's protocol on a saved checkpoint series: one c, bisected on the mean perplexity ratio of the
    last five checkpoints, applied to every checkpoint; recomputed here from the weight files."""
    out, _, _ = trained
    spec = data.spec
    windows = zoo_data.eval_windows(data.heldout, spec.eval_windows, spec.seq_len)
    assert spec.eval_batch >= spec.eval_windows  # one batch: the thresholds by hand see the same tokens
    steps, target = zoo_spec.checkpoint_steps(spec), 1 + spec.ppl_p / 100
    for name in ("relu-w16-d2-s0", "silu-w16-d2-s0"):
        run = next(r for r in zoo_spec.family(spec) if r.name == name)
        rows = _rows(out / f"{name}.csv")
        assert [int(r["step"]) for r in rows] == steps
        assert [r["in_fixed_c"] for r in rows] == ["False"] * (len(steps) - 5) + ["True"] * 5
        c = float(rows[0]["cett"])
        assert all(float(r["cett"]) == c for r in rows)  # one c for every checkpoint
        models = [zoo_training.load_checkpoint(run, spec, data.vocab, paths.checkpoint_path(out, name, s), "cpu")
                  for s in steps]

        def mean_ratio(value, models=models):
            return sum(math.exp(s - d) for d, s, _ in (_by_hand_at(m, windows, value) for m in models[-5:])) / 5

        lo, hi, best = 0.0, 1.0, None  # the bisection, written out
        for _ in range(30):
            mid = (lo + hi) / 2
            ratio = mean_ratio(mid)
            if best is None or abs(ratio - target) < abs(best[1] - target):
                best = (mid, ratio)
            if abs(ratio - target) <= spec.tol:
                break
            lo, hi = (mid, hi) if ratio < target else (lo, mid)
        assert c == best[0] and rows[0]["cett_converged"] == str(abs(best[1] - target) <= spec.tol)
        for row, model in zip(rows, models, strict=True):
            dense, sparse, ratio = _by_hand_at(model, windows, c)
            assert float(row["dense_loss"]) == pytest.approx(dense, rel=1e-5)
            assert float(row["sparse_loss"]) == pytest.approx(sparse, rel=1e-5)
            assert float(row["activation_ratio"]) == pytest.approx(ratio, rel=1e-6)
            assert float(row["ppl_ratio"]) == pytest.approx(math.exp(sparse - dense), rel=1e-5)
            own = ppl_p(model, windows, p=spec.ppl_p, tol=spec.tol, batch_size=spec.eval_batch)
            assert float(row["own_cett"]) == own.cett and float(row["own_activation_ratio"]) == own.activation_ratio
        assert any(float(r["own_cett"]) != c for r in rows)  # the per-checkpoint variant is a different curve


def test_one_epoch_reads_no_training_window_twice(data_dir, data, tmp_path, monkeypatch):
    read = []

    def recording(windows, spec, device):
        read.append(windows.clone())
        return zoo_data.batch_indices(windows, spec, device)

    monkeypatch.setattr(zoo_training, "batch_indices", recording)
    zoo_training.train(data_dir, tmp_path, "relu-w8-d1-s0", log=lambda _: None)
    spec = data.spec
    numbers = torch.cat(read)
    assert len(read) == spec.steps and numbers.numel() == spec.steps * spec.batch_size
    assert numbers.unique().numel() == numbers.numel()  # no window twice
    targets = torch.cat([zoo_data.batch_indices(w, spec, "cpu")[:, 1:] for w in read]).flatten()
    assert targets.unique().numel() == targets.numel() and int(targets.max()) < data.train.numel()  # no token twice
    rows = _rows(tmp_path / "relu-w8-d1-s0.csv")
    assert float(rows[-1]["epochs"]) <= 1 and float(rows[-1]["tokens_per_param"]) == pytest.approx(
        spec.tokens / zoo_spec.family(spec)[0].params, rel=1e-3)


def test_a_run_trains_saves_every_checkpoint_and_resumes(trained, data_dir, data, tmp_path):
    out, names, command = trained
    spec = data.spec
    assert names == ["relu-w16-d2-s0", "silu-w16-d2-s0"]
    for name in names:
        rows = _rows(out / f"{name}.csv")
        assert list(rows[0]) == list(zoo_table.TABLE_COLUMNS)
        steps = zoo_spec.checkpoint_steps(spec)
        assert [int(r["step"]) for r in rows] == steps
        assert [int(r["tokens"]) for r in rows] == [s * spec.batch_size * spec.seq_len for s in steps]
        assert all(paths.checkpoint_path(out, name, s).exists() for s in steps)
        dense = [float(r["dense_loss"]) for r in rows]
        assert dense[-1] < dense[0] - 0.5 and float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
        assert all(0 < float(r["activation_ratio"]) <= 1 and 0 <= float(r["cett"]) <= 1 for r in rows)
        assert all(r["own_converged"] == "False" or abs(float(r["own_ppl_ratio"]) - 1.01) <= spec.tol for r in rows)
        record = json.loads((out / f"{name}.json").read_text())
        assert record["rows"] == len(rows) and record["machine"]["device"].startswith("CPU")
        assert record["command"] == command and record["shared_cett"]["cett"] == float(rows[0]["cett"])
    runs = tmp_path / "runs"
    runs.mkdir()
    for name in names:
        for suffix in (".csv", ".json"):
            (runs / f"{name}{suffix}").write_bytes((out / f"{name}{suffix}").read_bytes())
    stamp = (runs / "relu-w16-d2-s0.csv").stat().st_mtime_ns
    assert zoo_training.train(data_dir, runs, "*-w16-d2-s0", log=lambda _: None) == []  # finished: skipped
    assert (runs / "relu-w16-d2-s0.csv").stat().st_mtime_ns == stamp
    (runs / "silu-w16-d2-s0.json").unlink()  # as if the time limit had cut it off before the end
    assert zoo_training.train(data_dir, runs, "*-w16-d2-s0", log=lambda _: None) == ["silu-w16-d2-s0"]
    for a, b in zip(_rows(out / "silu-w16-d2-s0.csv"), _rows(runs / "silu-w16-d2-s0.csv"), strict=True):
        assert a["step"] == b["step"] and float(a["dense_loss"]) == pytest.approx(float(b["dense_loss"]), rel=1e-4)
    assert not zoo_table.is_finished(zoo_spec.family(spec)[0], runs, zoo_data.run_key(data.meta))

    dest = tmp_path / "table"
    path, missing = zoo_table.write_table(data_dir, [tmp_path / "empty", runs], dest, command=["make", "zoo"])
    assert sorted(missing) == sorted(r.name for r in zoo_spec.family(spec) if r.name not in names)
    table = _rows(path)
    assert table == _rows(runs / "relu-w16-d2-s0.csv") + _rows(runs / "silu-w16-d2-s0.csv")
    typed = zoo_table.read_table(path)
    assert typed[0]["run"] == "relu-w16-d2-s0" and typed[0]["step"] == 2 and isinstance(typed[0]["in_fixed_c"], bool)
    assert [r["dense_loss"] for r in typed] == [float(r["dense_loss"]) for r in table]
    provenance = json.loads((dest / "PROVENANCE.json").read_text())
    assert provenance["command"] == "make zoo" and set(provenance["git"]) == {"commit", "dirty"}
    assert provenance["missing_runs"] == missing and provenance["data"]["tokens"]["train"] == data.train.numel()
    assert provenance["machines"] == [record["machine"]["device"]]
    assert provenance["first_started"] <= provenance["last_finished"]
    for name in names:
        record = provenance["runs"][name]
        assert {"device", "torch", "transformers"} <= set(record["machine"]) and record["started"] <= record["finished"]
        assert record["shared_cett"]["steps"] == zoo_spec.checkpoint_steps(spec)[-5:]
        modules = ("__init__", "__main__", "data", "paths", "protocol", "spec", "table", "training")
        assert set(record["code_sha256"]) == {f"zoo/{m}.py" for m in modules} | {"sparsity.py"}


def test_cuda_zoo_without_a_gpu_and_missing_data_are_clear_errors(tmp_path, data_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    meta = json.loads((data_dir / "spec.json").read_text())
    meta["spec"]["device"] = "cuda"
    for name in ("train.npy", "heldout.npy"):
        (tmp_path / name).write_bytes((data_dir / name).read_bytes())
    (tmp_path / "spec.json").write_text(json.dumps(meta))
    with pytest.raises(BabelError, match="no GPU is visible"):
        zoo_training.train(tmp_path, tmp_path / "runs")
    with pytest.raises(BabelError, match="no zoo data"):
        zoo_data.load_data(tmp_path / "nothing")


def test_a_run_cut_off_leaves_no_finished_marker_and_restarts(data_dir, tmp_path, monkeypatch):
    save, calls = zoo_training.save_checkpoint, []

    def dies_at_the_third_checkpoint(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a time limit's signal does mid-run
        return save(*args)

    monkeypatch.setattr(zoo_training, "save_checkpoint", dies_at_the_third_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        zoo_training.train(data_dir, tmp_path, "relu-w8-d1-s0", log=lambda _: None)
    assert len(list((tmp_path / "relu-w8-d1-s0").glob("*.safetensors"))) == 2
    assert not (tmp_path / "relu-w8-d1-s0.json").exists() and not list(tmp_path.rglob(".*tmp"))
    monkeypatch.setattr(zoo_training, "save_checkpoint", save)
    assert zoo_training.train(data_dir, tmp_path, "relu-w8-d1-s0", log=lambda _: None) == ["relu-w8-d1-s0"]
    assert [int(r["step"]) for r in _rows(tmp_path / "relu-w8-d1-s0.csv")] == zoo_spec.checkpoint_steps(small_spec())


def test_the_library_alone_says_where_a_profiles_table_is():
    """`make` asks `python -m babel_lib.sparsing.zoo where`; the notebook calls paths.table_path: one rule."""
    import subprocess
    import sys

    from babel_lib.core.config import ROOT

    for profile, expected in (("smoke", "build/smoke/zoo/zoo.csv"), ("default", "data/zoo/zoo.csv"),
                              ("gpu", "data/zoo/zoo.csv")):
        assert paths.table_path(profile) == ROOT / expected
        where = subprocess.run([sys.executable, "-m", "babel_lib.sparsing.zoo", "where", "--profile", profile],
                               capture_output=True, text=True, check=True, cwd=ROOT)
        assert where.stdout.strip() == expected
