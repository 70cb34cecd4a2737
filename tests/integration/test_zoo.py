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
from babel_lib.sparsing.zoo import spec as zoo_spec
from babel_lib.sparsing.zoo import table as zoo_table
from babel_lib.sparsing.zoo import training as zoo_training
from babel_lib.errors import BabelError
from babel_lib.sparsing.sparsity import ppl_p


def small_spec(**changes) -> zoo_spec.ZooSpec:
    """The smoke zoo cut down to seconds: two languages, 40 paragraphs, 24 steps, 8 checkpoints."""
    spec = dataclasses.replace(
        zoo_spec.spec_from_profile("smoke"), languages=("en", "ja"), paragraphs=40, vocab_size=300, seq_len=32,
        scale_shapes=((8, 1), (16, 2), (24, 3)), ratio_shapes=((8, 2), (16, 2), (32, 1)), steps=24, batch_size=4,
        first_checkpoint=2, checkpoints=8, eval_windows=4, eval_batch=4, lr=1e-2)
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
    assert spec.activations == ("relu", "silu") and len(zoo_spec.checkpoint_steps(spec)) >= 8
    assert len({r.name for r in runs}) == len(runs) == 2 * len(set(spec.scale_shapes + spec.ratio_shapes))
    relu = [r for r in runs if r.activation == "relu"]
    scale = sorted((r for r in relu if "scale" in r.axes), key=lambda r: r.params)
    ratio = [r for r in relu if "ratio" in r.axes]
    assert len(scale) >= 3 and len({r.width_depth_ratio for r in scale}) == 1
    assert scale[-1].params >= 4 * scale[0].params  # a real range of scales
    assert len({r.width_depth_ratio for r in ratio}) >= 3
    median = sorted(r.params for r in ratio)[len(ratio) // 2]
    assert all(abs(r.params / median - 1) < 0.25 for r in ratio)  # about one parameter count


def test_default_and_gpu_zoo_are_the_same_family():
    assert zoo_spec.spec_from_profile("default") == zoo_spec.spec_from_profile("gpu")  # both write data/zoo


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


def test_relu_and_silu_of_one_shape_start_from_the_same_weights():
    spec = small_spec()
    relu, silu = (r for r in zoo_spec.family(spec) if r.width == 16 and r.depth == 2)
    a, b = (zoo_training.build_model(r, spec, 300).state_dict() for r in (relu, silu))
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = zoo_training.build_model(zoo_spec.family(spec)[0], spec, 300).state_dict()
    assert not torch.equal(other["model.embed_tokens.weight"][:, :8], a["model.embed_tokens.weight"][:, :8])


def test_checkpoints_and_wsd_schedule():
    spec = small_spec(steps=2000, first_checkpoint=25, checkpoints=12, warmup=0.05, decay=0.2)
    steps = zoo_spec.checkpoint_steps(spec)
    assert len(steps) == 12 and steps[0] == 25 and steps[-1] == 2000
    gaps = np.diff(np.log(steps))
    assert np.allclose(gaps, math.log(2000 / 25) / 11, atol=0.03)  # log-spaced
    lr = [zoo_training.lr_factor(s, spec) for s in range(1, 2001)]
    assert lr[:100] == pytest.approx([s / 100 for s in range(1, 101)])  # linear warmup over 5 %
    assert set(lr[99:1600]) == {1.0}  # stable
    assert lr[1600:] == pytest.approx([(2000 - s + 1) / 400 for s in range(1601, 2001)])  # linear decay, 20 %
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


def test_runs_are_selected_by_name_patterns():
    runs = zoo_spec.family(zoo_spec.spec_from_profile("default"))
    assert [r.name for r in zoo_spec.select(runs, "silu-*,relu-w128-d4")] == ["relu-w128-d4"] + [
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
    index = zoo_data.batch_indices(data.train, spec, torch.Generator().manual_seed(1))
    assert index.shape == (spec.batch_size, spec.seq_len + 1) and int(index.max()) < data.train.numel()
    assert torch.equal(index, zoo_data.batch_indices(data.train, spec, torch.Generator().manual_seed(1)))
    assert (torch.diff(index, dim=1) == 1).all()


# --- training, measuring, resuming, the table ----------------------------------------------------------------


def test_measure_is_ppl_p_on_the_model_with_the_brute_force_dense_loss(data):
    spec = data.spec
    run = zoo_spec.family(spec)[1]
    model = zoo_training.build_model(run, spec, data.vocab).eval()
    windows = zoo_data.eval_windows(data.heldout, spec.eval_windows, spec.seq_len)
    point = zoo_training.measure(model, windows, spec)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
    dense = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()
    assert point["dense_loss"] == pytest.approx(dense, rel=1e-5)
    reference = ppl_p(model, windows, p=spec.ppl_p, tol=spec.tol, batch_size=spec.eval_batch)
    assert point["cett"] == reference.cett and point["activation_ratio"] == reference.activation_ratio
    assert point["converged"] == reference.converged and point["bisections"] == len(reference.trace)
    assert point["ppl_ratio"] == pytest.approx(math.exp(point["sparse_loss"] - point["dense_loss"]))


def test_a_run_trains_measures_every_checkpoint_and_resumes(data_dir, data, tmp_path):
    out = tmp_path / "runs"
    spec = data.spec
    command = ["python", "-m", "babel_lib.sparsing.zoo", "train"]
    trained = zoo_training.train(data_dir, out, "relu-w16-d2,silu-w16-d2", jobs=2, command=command, log=lambda _: None)
    assert trained == ["relu-w16-d2", "silu-w16-d2"]
    for name in ("relu-w16-d2", "silu-w16-d2"):
        with open(out / f"{name}.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0]) == list(zoo_table.TABLE_COLUMNS)
        steps = zoo_spec.checkpoint_steps(spec)
        assert [int(r["step"]) for r in rows] == steps
        assert [int(r["tokens"]) for r in rows] == [s * spec.batch_size * spec.seq_len for s in steps]
        dense = [float(r["dense_loss"]) for r in rows]
        assert dense[-1] < dense[0] - 0.5 and float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
        assert all(0 < float(r["activation_ratio"]) <= 1 and 0 <= float(r["cett"]) <= 1 for r in rows)
        assert all(r["converged"] == "False" or abs(float(r["ppl_ratio"]) - 1.01) <= spec.tol for r in rows)
        record = json.loads((out / f"{name}.json").read_text())
        assert record["rows"] == len(rows) and record["machine"]["device"].startswith("CPU")
        assert record["command"] == command
    stamp = (out / "relu-w16-d2.csv").stat().st_mtime_ns
    assert zoo_training.train(data_dir, out, "relu-w16-d2,silu-w16-d2", log=lambda _: None) == []  # finished: skipped
    assert (out / "relu-w16-d2.csv").stat().st_mtime_ns == stamp
    with open(out / "silu-w16-d2.csv", newline="") as handle:
        parallel = list(csv.DictReader(handle))
    (out / "silu-w16-d2.json").unlink()  # as if the time limit had cut it off before the end
    assert zoo_training.train(data_dir, out, "*-w16-d2", log=lambda _: None) == ["silu-w16-d2"]
    with open(out / "silu-w16-d2.csv", newline="") as handle:
        again = list(csv.DictReader(handle))  # in this process: the same seeds, data order and losses
    for a, b in zip(parallel, again, strict=True):
        assert a["step"] == b["step"] and float(a["dense_loss"]) == pytest.approx(float(b["dense_loss"]), rel=1e-4)
    assert not zoo_table.is_finished(zoo_spec.family(spec)[0], out, zoo_data.run_key(data.meta))

    dest = tmp_path / "table"
    path, missing = zoo_table.write_table(data_dir, [tmp_path / "empty", out], dest, command=["make", "zoo"])
    assert sorted(missing) == sorted(r.name for r in zoo_spec.family(spec) if r.width != 16 or r.depth != 2)
    with open(path, newline="") as handle:
        table = list(csv.DictReader(handle))
    expected = []
    for name in ("relu-w16-d2", "silu-w16-d2"):
        with open(out / f"{name}.csv", newline="") as handle:
            expected += list(csv.DictReader(handle))
    assert table == expected
    typed = zoo_table.read_table(path)
    assert typed[0]["run"] == "relu-w16-d2" and typed[0]["step"] == 2 and isinstance(typed[0]["converged"], bool)
    assert [r["dense_loss"] for r in typed] == [float(r["dense_loss"]) for r in table]
    provenance = json.loads((dest / "PROVENANCE.json").read_text())
    assert provenance["command"] == "make zoo" and set(provenance["git"]) == {"commit", "dirty"}
    assert provenance["missing_runs"] == missing and provenance["data"]["tokens"]["train"] == data.train.numel()
    assert provenance["machines"] == [record["machine"]["device"]]
    for name in ("relu-w16-d2", "silu-w16-d2"):
        record = provenance["runs"][name]
        assert {"device", "torch", "transformers"} <= set(record["machine"]) and record["started"] <= record["finished"]
        modules = ("__init__", "__main__", "data", "paths", "spec", "table", "training")
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


def test_a_run_cut_off_keeps_its_finished_rows_and_restarts(data_dir, tmp_path, monkeypatch):
    measure, calls = zoo_training.measure, []

    def dies_at_the_third_checkpoint(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a time limit's signal does mid-run
        return measure(*args)

    monkeypatch.setattr(zoo_training, "measure", dies_at_the_third_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        zoo_training.train(data_dir, tmp_path, "relu-w8-d1", log=lambda _: None)
    with open(tmp_path / "relu-w8-d1.csv", newline="") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == zoo_spec.checkpoint_steps(small_spec())[:2]
    assert not (tmp_path / "relu-w8-d1.json").exists() and not list(tmp_path.glob(".*tmp"))
    monkeypatch.setattr(zoo_training, "measure", measure)
    assert zoo_training.train(data_dir, tmp_path, "relu-w8-d1", log=lambda _: None) == ["relu-w8-d1"]
    with open(tmp_path / "relu-w8-d1.csv", newline="") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == zoo_spec.checkpoint_steps(small_spec())


def test_the_library_alone_says_where_a_profiles_table_is():
    """`make` asks `python -m babel_lib.sparsing.zoo where`; the notebook calls paths.table_path: one rule."""
    import subprocess
    import sys

    from babel_lib.core.config import ROOT
    from babel_lib.sparsing.zoo import paths

    for profile, expected in (("smoke", "build/smoke/zoo/zoo.csv"), ("default", "data/zoo/zoo.csv"),
                              ("gpu", "data/zoo/zoo.csv")):
        assert paths.table_path(profile) == ROOT / expected
        where = subprocess.run([sys.executable, "-m", "babel_lib.sparsing.zoo", "where", "--profile", profile],
                               capture_output=True, text=True, check=True, cwd=ROOT)
        assert where.stdout.strip() == expected
