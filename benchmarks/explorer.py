"""The explorer's time to interactive and interaction latency in headless Chromium, against `make explore`.

Time to interactive: from a page request (the server already up, its kernel preheated) until the heatmap is drawn,
the page is connected to its kernel and a first control change has come back. Cold loads open the page in a new
browser context each (an empty HTTP cache); warm loads open it again in one context whose cache an uncounted first
load filled. Latency: from a control change until the heatmap shows its result. The machine's load average is
written with the results. Usage: python benchmarks/explorer.py [--profile smoke] [--loads 5] [--repeats 5]
(needs `make figures PROFILE=<profile>` first; writes benchmarks/results/explorer-<profile>.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine_name, write_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
TITLE = "() => { const g = document.querySelector('.babel-heatmap.js-plotly-plot'); " \
        "return g && g._fullLayout && g.data && g.data[0].z ? [g._fullLayout.title.text, Array.from(g.data[0].y), " \
        "g._fullLayout.xaxis.title.text, g.data[0].zmin, g.data[0].zmax, Array.from(g.data[0].z[0]).slice(0, 4)] : null; }"


def serve(profile: str, port: int) -> subprocess.Popen:
    """`make explore` on `port`, returned once it listens and its preheated kernel has run the app."""
    server = subprocess.Popen(["make", "-C", str(ROOT), "explore", f"PROFILE={profile}", f"EXPLORE_PORT={port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"make explore PROFILE={profile} exited with {server.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(15)  # the preheated kernel executes the app notebook
                return server
        time.sleep(0.5)
    raise SystemExit("make explore did not start within 300 s")


def changed(page, before) -> None:
    page.wait_for_function(f"b => {{ const p = ({TITLE})(); return p && JSON.stringify(p) !== JSON.stringify(b); }}",
                           arg=before, timeout=60_000)


def timed(page, action) -> float:
    """Seconds from `action()` until the heatmap differs from before it."""
    before = page.evaluate(TITLE)
    start = time.perf_counter()
    action()
    changed(page, before)
    return time.perf_counter() - start


def layers(page, text: str) -> None:
    page.locator(".babel-layers .widget-readout").click()
    page.keyboard.press("Control+A")
    page.keyboard.type(text)
    page.keyboard.press("Enter")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(args.profile, port)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    tti: dict[str, list[tuple[float, float, float]]] = {"cold": [], "warm": []}
    latency = {}
    load = [os.getloadavg()[0]]

    def interactive(context) -> tuple[float, float, float]:
        """Seconds from the page request until the heatmap is drawn, the kernel has answered, a change is back."""
        page = context.new_page()
        start = time.perf_counter()
        page.goto(f"http://localhost:{port}/")
        page.wait_for_function(TITLE, timeout=60_000)
        drawn = time.perf_counter() - start
        page.wait_for_function("() => location.search.includes('model=')", timeout=60_000)  # connected
        connected = time.perf_counter() - start
        before = page.evaluate(TITLE)
        page.locator(".babel-language select").select_option(index=1)
        changed(page, before)
        done = time.perf_counter() - start
        page.close(run_before_unload=True)
        time.sleep(20)  # the pool refills: a kernel starts and runs the app
        return drawn, connected, done

    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=ARGS)
            for _ in range(args.loads):
                context = browser.new_context()
                tti["cold"].append(interactive(context))
                context.close()
            context = browser.new_context()
            interactive(context)  # fills this context's cache
            tti["warm"] = [interactive(context) for _ in range(args.loads)]
            page = context.new_page()
            page.goto(f"http://localhost:{port}/")
            page.wait_for_function("() => location.search.includes('model=')", timeout=60_000)
            models = page.locator(".babel-model select option").all_inner_texts()
            actions = {
                "language": lambda i: page.locator(".babel-language select").select_option(index=(i + 1) % 2),
                "layer range": lambda i: layers(page, f"{i % 3}-{3 + i % 3}"),
                "view": lambda i: page.locator(".babel-view button").nth(1 - i % 2).click(),
                "expert order": lambda i: page.locator(".babel-order select").select_option(index=1 - i % 2),
                "colour scale": lambda i: page.locator(".babel-scale button").nth(1 - i % 2).click(),
                "model": lambda i: page.locator(".babel-model select").select_option(models[(i + 1) % len(models)]),
            }
            for name, action in actions.items():
                latency[name] = [timed(page, lambda: action(i)) for i in range(args.repeats)]
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    load.append(os.getloadavg()[0])
    machine = f"{machine_name(torch.device('cpu'))}, {os.cpu_count()} cores (headless Chromium on the same machine)"
    lines = [f"# Explorer: time to interactive and interaction latency (profile {args.profile})", "",
             (f"Machine: {machine}. Server: `make explore PROFILE={args.profile}` (Voilà, one preheated kernel). "
              f"Load average (1 min) {load[0]:.2f} at the first load, {load[1]:.2f} at the end."), "",
             ("Time to interactive: page request → heatmap drawn, kernel connected, first change answered "
              "(a language change back in the heatmap); each stage's time is from the page request."), "",
             "| what | runs | median (s) | max (s) |", "| --- | --- | --- | --- |"]
    for cache, runs in tti.items():
        for stage, label in enumerate(("heatmap drawn", "kernel connected", "time to interactive")):
            values = [run[stage] for run in runs]
            name = (f"**{label}**" if stage == 2 else label) + f", {cache} cache"
            lines.append(f"| {name} | {len(values)} | {statistics.median(values):.2f} | {max(values):.2f} |")
    lines += [f"| {name} change → heatmap updated | {len(v)} | {statistics.median(v):.3f} | {max(v):.3f} |"
              for name, v in latency.items()]
    write_table(f"explorer-{args.profile}", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
