"""Notebook 04's scaling study on the zoo table: each run's activation ratio over training (the paper's protocol:
one CETT value per run) fitted with its activation's form (`scaling.fit_runs`), the seeds of each shape summarised
by their mean and spread (min–max), the per-checkpoint-c variant beside it, the limits compared across shapes,
ReLU's and SiLU's dense loss side by side, and the sentences that summarise them (`ScalingResult.findings`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

from babel_lib.sparsing.scaling import DIRECTION, FORM_NAME, PAPER, PowerLaw, ScalingParams, fit_runs, fitted_curve
from babel_lib.sparsing.zoo import paths

AXES = {"ratio": ("width_depth", "width/depth"), "scale": ("params", "parameters")}
PROTOCOL_COLUMNS = ("shape", "seed", "tokens_per_param", "own_activation_ratio", "dense_loss")  # the seeded protocol


def _spread(frame: pd.DataFrame, keys: list[str], columns: list[str]) -> pd.DataFrame:
    """Mean, min (`_lo`) and max (`_hi`) of `columns` over the rows of each `keys` group, and the group size."""
    grouped = frame.groupby(keys, sort=True)
    out = grouped[columns].mean()
    for suffix, how in (("_lo", "min"), ("_hi", "max")):
        out = out.join(grouped[columns].agg(how).add_suffix(suffix))
    return out.join(grouped.size().rename("seeds")).reset_index()


def seed_bands(table: pd.DataFrame) -> pd.DataFrame:
    """Per series and token count, the mean, min and max over seeds of the activation ratio, of the per-checkpoint
    variant and of the dense loss (where the table has them). A series is an activation and shape (`run` is
    "<activation>-<shape>"); a table without shapes (hub checkpoints) has one series per run."""
    table = table.assign(series=table["activation"] + "-" + table["shape"] if "shape" in table else table["run"])
    columns = [c for c in ("activation_ratio", "own_activation_ratio", "dense_loss") if c in table]
    keys = ["series", "activation", "width", "depth", "params", "tokens"] + (["axes"] if "axes" in table else [])
    return _spread(table, keys, columns).rename(columns={"series": "run"})


@dataclass
class ScalingResult:
    """The zoo table (None when there is none to use, with the reason), its per-run fits, and the token unit."""

    location: str  # the table, relative to the checkout
    table: pd.DataFrame | None
    fits: pd.DataFrame  # one row per run, i.e. per seed (scaling.fit_runs on the paper's protocol)
    unit: float
    unit_name: str
    provenance: str | None  # PROVENANCE.json beside the table, if there is one
    reason: str | None = None  # why there is no table to use
    missing: tuple[str, ...] = ()  # runs of the planned family that the table lacks (PROVENANCE.json)

    @property
    def available(self) -> bool:
        return self.table is not None

    @cached_property
    def bands(self) -> pd.DataFrame:
        """`seed_bands` of the table: one row per activation, shape and checkpoint."""
        return seed_bands(self.table)

    @cached_property
    def band_fits(self) -> pd.DataFrame:
        """The paper's forms fitted to each shape's seed-mean curve (what the figure draws)."""
        return fit_runs(self.bands, unit=self.unit)

    @cached_property
    def curves(self) -> dict[str, PowerLaw]:
        return {row["run"]: fitted_curve(row, unit=self.unit) for _, row in self.band_fits.iterrows()}

    @cached_property
    def shapes(self) -> pd.DataFrame:
        """One row per activation and shape: the seeds' mean, min and max (`_lo`, `_hi`) of the last checkpoint's
        activation ratio (`last_ratio`), its per-checkpoint-c variant (`own_last`), the dense loss, the fitted
        A₀ and the trend (Spearman ρ over tokens); `identified`: how many seeds' fits identify A₀."""
        last = self.table.sort_values("tokens").groupby("run").tail(1).set_index("run")
        runs = self.fits.set_index("run").join(last[["shape", "seed", "axes", "tokens_per_param", "dense_loss",
                                                     "own_activation_ratio"]])
        runs = runs.rename(columns={"own_activation_ratio": "own_last"}).reset_index()
        keys = ["activation", "shape", "width", "depth", "width_depth", "params", "axes"]
        out = _spread(runs, keys, ["last_ratio", "own_last", "dense_loss", "a0", "trend", "tokens_per_param"])
        return out.merge(runs.groupby(keys)["a0_identified"].sum().rename("identified").reset_index(), on=keys)

    def limits(self, group: pd.DataFrame) -> pd.DataFrame:
        """The shapes of `group` whose fit identifies A₀ in every seed."""
        return group[group["identified"] == group["seeds"]]

    def on_axis(self, axis: str) -> pd.DataFrame:
        """The shapes on one axis of the family: "scale" (one width/depth) or "ratio" (about one size)."""
        shapes = self.shapes
        return shapes[shapes["axes"].str.contains(axis)].reset_index(drop=True)

    def along(self, axis: str) -> dict[str, tuple[pd.DataFrame, float]]:
        """Per activation with at least 3 shapes on `axis`: the shapes sorted along it and Spearman ρ of the
        seed-mean last-checkpoint ratio against the axis variable."""
        x = AXES[axis][0]
        out = {}
        for form, group in self.on_axis(axis).groupby("activation"):
            if len(group) >= 3:
                group = group.sort_values(x)
                out[form] = (group, float(spearmanr(group[x], group["last_ratio"]).statistic))
        return out

    def losses(self) -> pd.DataFrame:
        """Per shape with both activations: the last checkpoint's dense loss of each (seed mean, min, max) and the
        seed-paired difference ReLU − SiLU (same initial weights and data order): mean, min, max."""
        last = self.table.sort_values("tokens").groupby("run").tail(1)
        pairs = last.pivot_table(index=["shape", "seed", "params", "width_depth_ratio"], columns="activation",
                                 values="dense_loss").dropna().reset_index()
        if pairs.empty or not {"relu", "silu"} <= set(pairs.columns):
            return pd.DataFrame()
        pairs = pairs.assign(difference=pairs["relu"] - pairs["silu"])
        return _spread(pairs, ["shape", "params", "width_depth_ratio"], ["relu", "silu", "difference"]).sort_values(
            ["params", "width_depth_ratio"]).reset_index(drop=True)

    def constants(self) -> pd.DataFrame:
        """The paper's published constants and ours (one row per run, i.e. per seed) side by side."""
        paper = pd.DataFrame([{"source": "paper", "run": f"{form} {scale}", **law.as_row()}
                              for (form, scale), law in PAPER.items()])
        if not self.available:
            return paper
        ours = self.fits.assign(source="ours", form=self.fits["activation"])
        return pd.concat([paper, ours[["source", "run", "form", "alpha", "b", "c", "a0", "rmse"]]], ignore_index=True)

    @property
    def fixed_last(self) -> int:
        """How many last checkpoints each run's one c was bisected on."""
        return int(self.table.groupby("run")["in_fixed_c"].sum().max())

    def note(self) -> str:
        """The family in one parenthesis, for verdicts: runs, seeds, epochs, tokens per parameter, protocol."""
        shapes, table = self.shapes, self.table
        return (f"micro family: {table['run'].nunique()} runs = {table['shape'].nunique()} shapes × "
                f"{table['activation'].nunique()} activations × {int(shapes['seeds'].max())} seeds, "
                f"{table['epochs'].max():.2f} epoch, {shapes['tokens_per_param'].min():.0f}-"
                f"{shapes['tokens_per_param'].max():.0f} tokens/parameter; one c per run bisected on its last "
                f"{self.fixed_last} checkpoints; spread = min–max over seeds"
                + (f"; {len(self.missing)} planned runs not trained: {', '.join(self.missing)}" if self.missing else ""))

    def findings(self) -> list[str]:
        if not self.available:
            return [self.reason]
        shapes = self.shapes
        lines = [f"{self.location}: {len(self.table)} checkpoints of {self.table['run'].nunique()} runs "
                 f"({self.note()})" + (f"; provenance in {self.provenance}" if self.provenance else "")]
        for form, group in shapes.groupby("activation"):
            lines.append(f"{FORM_NAME[form]}: " + self.limit_sentence(form, group))
        for form, group in shapes.groupby("activation"):
            lines.append(f"{FORM_NAME[form]}, the protocol's effect: at the last checkpoint the ratio is "
                         f"{group['last_ratio'].min():.3f}-{group['last_ratio'].max():.3f} with one c per run and "
                         f"{group['own_last'].min():.3f}-{group['own_last'].max():.3f} with a c per checkpoint; "
                         f"over training it rises in {int((group['trend'] > 0).sum())} of {len(group)} shapes "
                         f"(seed-mean Spearman ρ {group['trend'].min():+.2f} to {group['trend'].max():+.2f}; the "
                         f"paper's form {'decreases' if DIRECTION[form] < 0 else 'increases'}).")
        if {"relu", "silu"} <= set(shapes["activation"]):
            pivot = shapes.pivot(index="shape", columns="activation", values="last_ratio").dropna()
            lines.append(f"ReLU is sparser than SiLU in {int((pivot['relu'] < pivot['silu']).sum())} of {len(pivot)} "
                         f"shapes at the last checkpoint (seed means {pivot['relu'].mean():.3f} vs "
                         f"{pivot['silu'].mean():.3f}, {pivot['silu'].mean() / pivot['relu'].mean():.1f}x).")
            lines.append(self.loss_finding())
        for axis in ("ratio", "scale"):
            x, label = AXES[axis]
            for form, (group, rho) in self.along(axis).items():
                lines.append(f"{FORM_NAME[form]} along {label} ({', '.join(f'{v:,.0f}' for v in group[x])}): "
                             "last-checkpoint ratio " + ", ".join(
                                 f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in
                                 zip(group["last_ratio"], group["last_ratio_lo"], group["last_ratio_hi"]))
                             + f" (seed mean [min, max]; Spearman ρ of the means {rho:+.2f}).")
        return lines

    def loss_finding(self) -> str:
        """ReLU's dense loss against SiLU's at the last checkpoint, per shape, paired by seed."""
        return "Dense loss at the last checkpoint, ReLU − SiLU (paired by seed, mean [min, max]): " + ", ".join(
            f"{r['shape']} {r['difference']:+.3f} [{r['difference_lo']:+.3f}, {r['difference_hi']:+.3f}] nats"
            for _, r in self.losses().iterrows()) + "."

    def summary(self) -> list[str]:
        """The closing note, per activation: the measured limit (or why none), and the trends with data,
        width/depth and scale against the paper's, with the seeds' spread."""
        if not self.available:
            return [self.reason]
        lines = []
        for form, group in self.shapes.groupby("activation"):
            runs = self.fits[self.fits["activation"] == form]
            right = int((runs["trend"] * DIRECTION[form] > 0).sum())
            parts = [f"{FORM_NAME[form]}: {self.limit_sentence(form, group).rstrip('.')}",
                     f"with data, {right} of {len(runs)} runs move in the paper's direction "
                     f"({'down' if DIRECTION[form] < 0 else 'up'})"]
            along = {axis: self.along(axis).get(form) for axis in AXES}
            for axis, found in along.items():
                if found is None:
                    parts.append(f"along {AXES[axis][1]}: fewer than 3 shapes")
                    continue
                shapes, rho = found
                widest = float((shapes["last_ratio_hi"] - shapes["last_ratio_lo"]).max())
                parts.append(f"along {AXES[axis][1]} the last-checkpoint ratio goes {shapes['last_ratio'].iloc[0]:.3f} → "
                             f"{shapes['last_ratio'].iloc[-1]:.3f} (Spearman ρ {rho:+.2f}; seed spread up to {widest:.3f})")
            lines.append("; ".join(parts) + ".")
        return lines

    def limit_sentence(self, form: str, group: pd.DataFrame) -> str:
        """The measured limit A₀ of one activation's shapes, or why the fits identify none."""
        limits = self.limits(group)
        published = [law.a0 for (f, _), law in PAPER.items() if f == form]
        against = int((group["trend"] * DIRECTION[form] <= 0).sum())
        if limits.empty:
            why = (f"the ratio moves against the form's direction in {against} of {len(group)} shapes"
                   if against else "the fitted A₀ sits on its bound (the curve has not bent towards a limit)")
            found = f"no shape's fits identify a limit A₀ in every seed ({why})"
        else:
            found = (f"a limit A₀ is identified in every seed for {len(limits)} of {len(group)} shapes: " + ", ".join(
                f"{r['shape']} {r['a0']:.3f} [{r['a0_lo']:.3f}, {r['a0_hi']:.3f}]" for _, r in limits.iterrows()))
        return found + f"; the paper's A₀: {min(published):.3f}-{max(published):.3f}."


def zoo_scaling(profile: str, params: ScalingParams) -> ScalingResult:
    """The scaling study of `profile`'s zoo table (`make zoo` writes it; `zoo.paths` says where)."""
    path: Path = paths.table_path(profile)
    location = paths.table_location(profile)
    if not path.exists():
        return ScalingResult(location, None, pd.DataFrame(), params.token_unit, params.token_unit_name, None,
                             f"No zoo table at {location}: the scaling section is skipped. Train the micro family with "
                             "`make zoo` (a GPU run) or restore the committed data/zoo/zoo.csv, then run this notebook again.")
    table = pd.read_csv(path)
    missing = [c for c in PROTOCOL_COLUMNS if c not in table]
    if missing:
        return ScalingResult(location, None, pd.DataFrame(), params.token_unit, params.token_unit_name, None,
                             f"The zoo table at {location} predates the seeded one-epoch protocol (no {', '.join(missing)}"
                             " columns): the scaling section is skipped. Train the family again with `make zoo`.")
    provenance = path.parent / "PROVENANCE.json"
    missing = tuple(json.loads(provenance.read_text()).get("missing_runs", [])) if provenance.exists() else ()
    return ScalingResult(location, table, fit_runs(table, unit=params.token_unit), params.token_unit,
                         params.token_unit_name,
                         str(Path(location).parent / provenance.name) if provenance.exists() else None,
                         missing=missing)
