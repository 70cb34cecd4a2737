"""What every benchmark table states: the machine it ran on."""

import platform
from pathlib import Path

import torch


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def write_table(name: str, lines: list[str], also: str | Path | None = None) -> Path:
    """Write a result table to benchmarks/results/<name>.md (and a copy into the folder `also`) and say where."""
    out = Path(__file__).parent / "results" / f"{name}.md"
    for path in [out] + ([Path(also) / out.name] if also else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        print(f"\nwritten to {path}")
    return out


def kernel_times(fn) -> dict[str, tuple[int, float]]:
    """The CUDA kernels (and copies) that one call of fn() runs: {name: (launches, total microseconds)}, from
    torch.profiler, after a synchronisation (so only fn's kernels are in)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        fn()
        torch.cuda.synchronize()
    out = {}
    for event in trace.key_averages():
        micros = getattr(event, "device_time_total", None)
        micros = event.cuda_time_total if micros is None else micros
        if micros > 0:
            out[event.key] = (event.count, micros)
    return out


def trace_summary(title: str, variants: dict[str, dict[str, tuple[int, float]]], bare: str, rows: int = 15
                  ) -> list[str]:
    """Markdown: per variant, its total kernel time against the bare forward's, and the kernels that make the
    difference (time in the variant minus time of the same kernel in the bare forward), largest first."""
    base = variants[bare]
    total = sum(t for _, t in base.values())
    launches = sum(n for n, _ in base.values())
    lines = [f"## {title}", "", f"bare forward: {total / 1000:,.2f} ms of kernels, {launches} launches", ""]
    for name, kernels in variants.items():
        if name == bare:
            continue
        extra = {k: (n - base.get(k, (0, 0.0))[0], t - base.get(k, (0, 0.0))[1]) for k, (n, t) in kernels.items()}
        spent = sum(t for _, t in kernels.values())
        launches = sum(n for n, _ in kernels.values())
        lines += [f"### {name}", "", f"{spent / 1000:,.2f} ms of kernels ({spent / total:.4f}x bare), {launches} launches",
                  "",
                  "| kernel | extra launches | extra µs | µs per extra launch |", "| --- | --- | --- | --- |"]
        for kernel, (n, t) in sorted(extra.items(), key=lambda item: -item[1][1])[:rows]:
            lines.append(f"| `{kernel[:110]}` | {n} | {t:,.1f} | {t / n if n else float('nan'):,.1f} |")
        lines.append("")
    return lines
