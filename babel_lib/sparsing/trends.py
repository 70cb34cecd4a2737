"""Notebook 04's scaling study on the zoo table: each run's activation ratio over training fitted with its
activation's form (`scaling.fit_runs`), the last-checkpoint ratios and limits compared across shapes, and the
sentences that summarise them (`ScalingResult.findings`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

from babel_lib.sparsing.scaling import DIRECTION, FORM_NAME, PAPER, PowerLaw, ScalingParams, fit_runs, fitted_curve
from babel_lib.sparsing.zoo import paths

AXES = {"ratio": ("width_depth", "width/depth"), "scale": ("params", "parameters")}


@dataclass
class ScalingResult:
    """The zoo table (None when no table was made), its fits, and the token unit they are expressed in."""

    location: str  # the table, relative to the checkout
    table: pd.DataFrame | None
    fits: pd.DataFrame  # one row per run (scaling.fit_runs)
    unit: float
    unit_name: str
    provenance: str | None  # PROVENANCE.json beside the table, if there is one

    @property
    def available(self) -> bool:
        return self.table is not None

    @property
    def curves(self) -> dict[str, PowerLaw]:
        return {row["run"]: fitted_curve(row, unit=self.unit) for _, row in self.fits.iterrows()}

    @property
    def last(self) -> pd.DataFrame:
        """The fits indexed by run, with each run's axes ("scale", "ratio" or both)."""
        return self.fits.set_index("run").join(self.table.groupby("run")["axes"].first())

    def on_axis(self, axis: str) -> pd.DataFrame:
        """The runs on one axis of the family: "scale" (one width/depth) or "ratio" (about one size)."""
        last = self.last
        return last[last["axes"].str.contains(axis)].reset_index()

    def shapes(self) -> pd.DataFrame:
        """Last-checkpoint activation ratio per shape (rows) and activation (columns)."""
        last = self.last
        return last.assign(shape=[r.split("-", 1)[1] for r in last.index]).pivot(
            index="shape", columns="activation", values="last_ratio")

    def along(self, axis: str) -> dict[str, tuple[pd.DataFrame, float]]:
        """Per activation with at least 3 runs on `axis`: the runs sorted along it and Spearman ρ of the
        last-checkpoint ratio against the axis variable."""
        x = AXES[axis][0]
        out = {}
        for form, group in self.on_axis(axis).groupby("activation"):
            if len(group) >= 3:
                group = group.sort_values(x)
                out[form] = (group, float(spearmanr(group[x], group["last_ratio"]).statistic))
        return out

    def constants(self) -> pd.DataFrame:
        """The paper's published constants and ours (one row per fitted run) side by side."""
        paper = pd.DataFrame([{"source": "paper", "run": f"{form} {scale}", **law.as_row()}
                              for (form, scale), law in PAPER.items()])
        if not self.available:
            return paper
        ours = self.fits.assign(source="ours", form=self.fits["activation"])
        return pd.concat([paper, ours[["source", "run", "form", "alpha", "b", "c", "a0", "rmse"]]], ignore_index=True)

    @property
    def epochs(self) -> float:
        return float(self.table["epochs"].max()) if "epochs" in self.table else float("nan")

    def findings(self) -> list[str]:
        if not self.available:
            return [f"No zoo table at {self.location}: the scaling section is skipped. Train the micro family with "
                    "`make zoo` (a GPU run) or restore the committed data/zoo/zoo.csv, then run this notebook again."]
        lines = [f"{self.location}: {len(self.table)} checkpoints of {self.table['run'].nunique()} runs"
                 + (f"; provenance in {self.provenance}" if self.provenance else "")]
        for form, group in self.last.groupby("activation"):
            limits = group[group["a0_identified"]]
            published = [law.a0 for (f, _), law in PAPER.items() if f == form]
            lines.append(
                f"{FORM_NAME[form]}: at the last checkpoint ({group['max_tokens'].max():,} tokens) the PPL-1% "
                f"activation ratio is {group['last_ratio'].min():.3f}-{group['last_ratio'].max():.3f} over "
                f"{len(group)} runs; it rises over training in {int((group['trend'] > 0).sum())} of them "
                f"(Spearman ρ {group['trend'].min():+.2f} to {group['trend'].max():+.2f}; the paper's "
                f"{FORM_NAME[form]} form {'decreases' if DIRECTION[form] < 0 else 'increases'}). The fit identifies "
                f"a limit A₀ in {len(limits)} run(s)"
                + (f" ({limits['a0'].min():.3f}-{limits['a0'].max():.3f})" if len(limits) else "")
                + f"; the paper's A₀: {min(published):.3f}-{max(published):.3f}.")
        if {"relu", "silu"} <= set(self.fits["activation"]):
            shape = self.shapes()
            sparser = int((shape["relu"] < shape["silu"]).sum())
            lines.append(f"ReLU is sparser than SiLU in {sparser} of {len(shape)} shapes at the last checkpoint (mean "
                         f"{shape['relu'].mean():.3f} vs {shape['silu'].mean():.3f}, "
                         f"{shape['silu'].mean() / shape['relu'].mean():.1f}x).")
        for axis in ("ratio", "scale"):
            x, label = AXES[axis]
            for form, (group, rho) in self.along(axis).items():
                lines.append(f"{FORM_NAME[form]} along {label} ({', '.join(f'{v:,.0f}' for v in group[x])}): "
                             f"last-checkpoint ratio {', '.join(f'{v:.3f}' for v in group['last_ratio'])} "
                             f"(Spearman ρ {rho:+.2f}).")
        return lines


def zoo_scaling(profile: str, params: ScalingParams) -> ScalingResult:
    """The scaling study of `profile`'s zoo table (`make zoo` writes it; `zoo.paths` says where)."""
    path: Path = paths.table_path(profile)
    location = paths.table_location(profile)
    if not path.exists():
        return ScalingResult(location, None, pd.DataFrame(), params.token_unit, params.token_unit_name, None)
    table = pd.read_csv(path)
    provenance = path.parent / "PROVENANCE.json"
    return ScalingResult(location, table, fit_runs(table, unit=params.token_unit), params.token_unit,
                         params.token_unit_name,
                         str(Path(location).parent / provenance.name) if provenance.exists() else None)
