"""Notebook 03's sentences and verdicts, computed on small synthetic results (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from babel_lib.massive import verdicts
from babel_lib.massive.attention import Attention
from babel_lib.massive.constancy import Constancy, Languages
from babel_lib.massive.intervene import Interventions
from babel_lib.massive.locate import CriterionParams, find
from babel_lib.massive.scan import Run, Scan, ScanParams, ScanResult
from babel_lib.massive.stats import bootstrap, cv


class Chars:
    """A tokenizer whose token i decodes to CHARS[i]."""

    CHARS = ["<s>", "a", "b", ".", "c", "\n"]

    def decode(self, ids):
        return "".join(self.CHARS[i] for i in ids)


def synthetic_scan(n: int = 4, layers: int = 4, k: int = 3, massive_from: int = 1, dim: int = 7,
                   position: int = 0) -> ScanResult:
    """Windows where `dim` at `position` is 2000 (+1 per window) from layer `massive_from` on, the rest ~1,
    median 0.5."""
    values = torch.ones(n, layers, k)
    positions = torch.full((n, layers, k), 2, dtype=torch.long)
    dims = torch.tensor([1, 2, 3]).expand(n, layers, k).clone()
    values[:, massive_from:, 0] = 2000 + torch.arange(n, dtype=torch.float)[:, None]
    positions[:, massive_from:, 0] = position
    dims[:, massive_from:, 0] = dim
    ids = torch.tensor([[1, 2, 3, 4, 5, 1]] * n)
    scan = Scan(values, positions, dims, torch.full((n, layers), 0.5), ids)
    return ScanResult(Run("m", False), ScanParams(seq_len=6, top_k=3), scan, torch.arange(n) % 2, {})


def test_scan_findings_name_the_peak_and_its_spread():
    result = synthetic_scan()
    assert result.peak() == (1, 2001.5, 0.5)
    first, spread = result.findings()
    assert first == ("m · without BOS: the largest activation peaks at layer 1 with |h| = 2,002 on average, "
                     "4,003x the median magnitude there (0.50).")
    assert spread == ("m · without BOS: per window, top-1 / median at layer 1 has a median of 4,003x (5-95% of 4 "
                      "windows: 4,000x to 4,006x).")  # windows 4000, 4002, 4004, 4006


def test_located_findings_and_targets():
    located = find(synthetic_scan(), Chars(), CriterionParams())
    assert [(t.dim, t.first_layer, t.last_layer) for t in located.targets] == [(7, 1, 3)]
    assert located.strongest == located.targets[0]
    assert located.findings() == ["m · without BOS: 1 massive dimension(s) [7]; the largest, dim 7 (|h| up to 2,003), "
                                  "is massive from layer 1 to 3 in most sequences, found in 100% of them (4 start)."]
    none = find(synthetic_scan(), Chars(), CriterionParams(magnitude=5000))
    assert none.strongest is None and none.findings() == [
        "m · without BOS: no dimension is massive in at least 50% of the sequences."]


def test_saturation_is_warned():
    result = synthetic_scan()
    result.scan.values[0, 2] = 3000.0  # every kept entry of one (sequence, layer) is massive
    assert find(result, Chars(), CriterionParams()).findings()[0].startswith(
        "warning: m · without BOS: 1 (sequence, layer) pairs have all top_k=3 entries massive")


def test_constancy_findings():
    rows = [{"dim": 7, "kind": "start", "layer": 2, "n": 4, "mean": 100.0, "std": 5.0, "cv": 0.05},
            {"dim": 7, "kind": "delimiter", "layer": 2, "n": 3, "mean": -50.0, "std": 10.0, "cv": 0.2},
            {"dim": 9, "kind": "start", "layer": 2, "n": 4, "mean": 10.0, "std": 0.0, "cv": 0.0}]
    assert Constancy("m · with BOS", rows).findings() == [
        "m · with BOS: identical in every sequence: dim 9 on start.",
        "m · with BOS: the steadiest varying massive activation, dim 7 on start tokens at layer 2, is 100.0 ± 5.0 over "
        "4 occurrences (CV 5.0%); the CVs range from 5.0% to 20.0%."]


def test_language_findings():
    values = {"en": torch.tensor([10.0, 12.0]), "de": torch.tensor([14.0, 14.0])}
    result = Languages("m", ["en", "de", "fr"], {7: 2, 9: 1}, 7, 2, "dim 7 on start tokens, layer 2, without BOS",
                       values)
    spread = result.spread()
    assert math.isclose(spread["between_cv"], torch.tensor([11.0, 14.0]).std().item() / 12.5, rel_tol=1e-6)
    assert result.findings() == ["m: massive dimensions per language: dim 7 in 2 of 3 languages, dim 9 in 1 of 3 "
                                 "languages. The value of dim 7 on start tokens, layer 2, without BOS occurs in 2 of 3 "
                                 "languages; the language means vary by CV 17.0% against a mean within-language CV "
                                 "of 6.4%."]  # std(11, 14) / 12.5; mean of 1.41/11 and 0
    empty = Languages("m", ["en"], {7: 1}, 7, 2, "dim 7, layer 2, without BOS", {})
    assert empty.findings() == ["m: dim 7 is not massive at layer 2 in any sequence without BOS."]


def nll(original: float, zero: float, mean: float, zero_every: float | None = None) -> Interventions:
    zero_every = zero if zero_every is None else zero_every
    per = {"mean, every layer": mean, "mean, first layer": mean, "original": original,  # sorted, as JSON gives them
           "zero, every layer": zero_every, "zero, first layer": zero}
    return Interventions("m · with BOS", 64, {c: {"en": math.log(v), "de": math.log(v * 1.1)} for c, v in per.items()})


def test_intervention_findings_and_verdict():
    result = nll(10.0, 1e6, 10.2)
    assert result.findings() == ["m · with BOS: median perplexity over 2 languages at seq_len 64: original 10.00; "
                                 "zero, first layer 1,000,000.00; mean, first layer 10.20; zero, every layer "
                                 "1,000,000.00; mean, every layer 10.20."]  # torch's lower median: the en value
    assert verdicts.intervention(result, "m").verdict == "reproduced"
    assert verdicts.intervention(nll(10.0, 11.0, 10.0, zero_every=1e4), "m").verdict == "partly"
    assert verdicts.intervention(nll(10.0, 11.0, 10.0), "m").verdict == "not reproduced"
    assert verdicts.intervention(nll(10.0, 1e6, 15.0), "m").verdict == "not reproduced"
    assert verdicts.intervention(None, "m").verdict == "not attempted"
    assert math.isinf(Interventions("x", 8, {"original": {"en": 800.0}}).perplexity["original"]["en"])


def attention_result(before: float, after: float, noise: float = 0.01) -> Attention:
    gen = torch.Generator().manual_seed(0)
    mass = torch.full((20, 6), before)
    mass[:, 3:] = after  # the activation appears at block 2: inputs of layers 3.. carry it
    mass += noise * torch.randn(20, 6, generator=gen)
    return Attention("m", {}, [], mass, 0.05, (2, 4))


def test_attention_findings_and_verdict():
    result = attention_result(0.1, 0.6, noise=0.0)
    first, per_layer = result.findings()
    assert first == ("m: attention on the massive-activation tokens averages 10.0% up to layer 2 and 60.0% from "
                     "layer 3 to 5; uniform attention would give them 5.0%.")
    assert per_layer.startswith("m: per layer around the appearance (the activation is in the output of block 2): "
                                "layer 0 10.0%, layer 1 10.0%, layer 2 10.0%, layer 3 60.0%, layer 4 60.0%, layer 5 "
                                "60.0%; after minus before per window: +50.0% (95% bootstrap CI +50.0% to +50.0%")
    assert verdicts.attention(attention_result(0.1, 0.6), "m").verdict == "reproduced"
    assert verdicts.attention(attention_result(0.6, 0.6), "m").verdict == "partly"  # a sink before it appears
    assert verdicts.attention(attention_result(0.02, 0.06), "m").verdict == "not reproduced"


def test_location_verdicts():
    located = find(synthetic_scan(n=8, layers=8, massive_from=1), Chars(), CriterionParams())
    assert verdicts.magnitude(located).verdict == "reproduced"
    assert verdicts.dimensions(located).verdict == "reproduced"
    tokens = verdicts.tokens(located)
    assert tokens.verdict == "reproduced" and "100% of each window's" in tokens.ours
    assert verdicts.layers(located).verdict == "reproduced"  # from layer 1 of 8 to the last
    late = find(synthetic_scan(n=8, layers=8, massive_from=5, position=1), Chars(), CriterionParams())
    assert verdicts.layers(late).verdict == "not reproduced"  # layers 5-7: late and short
    assert verdicts.tokens(late).verdict == "not reproduced"  # token 'b' is an "other" token
    constant = verdicts.constancy(located, Chars())
    assert constant.verdict == "reproduced" and "CV 0.1%" in constant.ours  # 2000..2007
    small = find(synthetic_scan(n=8, layers=8, massive_from=1), Chars(), CriterionParams(median_ratio=3000))
    assert small.strongest is not None and verdicts.magnitude(small).verdict == "reproduced"
    weak = synthetic_scan(n=8, layers=8)
    weak.scan.median[:] = 1.5  # ratio ~1,300: meets the criterion, below 10^3.5
    assert verdicts.magnitude(find(weak, Chars(), CriterionParams())).verdict == "partly"


def test_bootstrap_brackets_the_estimate():
    values = torch.arange(1.0, 21.0)
    est, low, high = bootstrap(values)
    assert est == 10.5 and low < 10.5 < high and high - low < 6
    assert bootstrap(torch.tensor([3.0])) == (3.0, 3.0, 3.0)
    est, low, high = bootstrap(values, cv)
    assert math.isclose(est, float(values.std() / values.mean()), rel_tol=1e-6) and low < est < high
    with pytest.raises(ValueError):
        bootstrap(torch.tensor([]))


def test_outlier_layers_are_kept_out_of_the_massive_range():
    """dim 9 is massive on 3 positions per window at layers 0-1 (an outlier feature under max_positions=2), then
    on the start token alone at layers 2-4 (a massive activation)."""
    n, layers, k = 4, 5, 4
    values, dims = torch.ones(n, layers, k), torch.tensor([1, 2, 3, 4]).expand(n, layers, k).clone()
    positions = torch.full((n, layers, k), 5, dtype=torch.long)
    values[:, :2, :3], dims[:, :2, :3], positions[:, :2, :3] = 500.0, 9, torch.tensor([1, 2, 3])
    values[:, 2:, 0], dims[:, 2:, 0], positions[:, 2:, 0] = 2000.0, 9, 0
    scan = Scan(values, positions, dims, torch.full((n, layers), 0.1), torch.tensor([[1, 2, 3, 4, 5, 1]] * n))
    located = find(ScanResult(Run("m", True), ScanParams(seq_len=6, top_k=4), scan, torch.zeros(n, dtype=torch.long),
                              {}), Chars(), CriterionParams())
    assert [(t.dim, t.first_layer, t.last_layer) for t in located.targets] == [(9, 2, 4)]
    assert located.summary[0]["outlier_layers"] == [0, 1]
    assert located.findings()[0] == ("m · with BOS: dim 9 is an outlier feature at layer(s) 0-1: massive on more than "
                                     "2 positions in most sequences there, so those layers are not part of its "
                                     "massive range.")
    assert {(m.position, m.first_layer, m.last_layer) for m in located.in_range()} == {(0, 2, 4)}
    unlimited = find(located.scan, Chars(), CriterionParams(max_positions=3))
    assert [(t.first_layer, t.last_layer) for t in unlimited.targets] == [(0, 4)]
    assert unlimited.summary[0]["outlier_layers"] == []


def test_longest_run_and_layer_list():
    from babel_lib.massive.locate import layer_list, longest_run

    assert longest_run(torch.tensor([True, False, True, True, True, False, True, True])) == [2, 3, 4]
    assert longest_run(torch.tensor([True, True, False, True, True])) == [0, 1]
    assert longest_run(torch.tensor([False, False])) == []
    assert layer_list([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert layer_list([3]) == "3"


def test_implicit_bias_findings_and_verdict():
    from babel_lib.massive.bias import ImplicitBias

    result = ImplicitBias("m", (1, 2), torch.tensor([0.1, 0.2, 0.98, 0.97, 0.5]), torch.tensor([0.3] * 5),
                          torch.tensor([0.97, 0.98, 0.96, 0.99]))
    assert list(result.layers()) == [2, 3]
    assert [(r["layer"], r["reads it"]) for r in result.rows()] == [(0, False), (1, False), (2, True), (3, True),
                                                                    (4, False)]
    assert result.findings()[0].startswith("m: in layers 2-3, the attention output's part from the massive-activation "
                                           "tokens has a mean cosine of 0.975 to its mean vector across queries and "
                                           "windows (per window 0.975, 95% CI")
    assert verdicts.implicit_bias(result, "m").verdict == "reproduced"
    result.per_window = torch.tensor([0.8, 0.75, 0.7, 0.85])
    assert verdicts.implicit_bias(result, "m").verdict == "partly"
    result.rest[:] = 0.9
    assert verdicts.implicit_bias(result, "m").verdict == "not reproduced"
    assert verdicts.implicit_bias(None, "m").verdict == "not attempted"
