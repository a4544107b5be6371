"""Property: on random CNN graphs with random masks (every kind of :mod:`random_graphs`: grouped and
depthwise convs, ConvTranspose, Pad, Resize, Slice/Gather, Sub/Sum, SE and spatial gates, multi-output
Split, shuffles, Transposes, GroupNorm, QDQ, negative and whole-layer masks), the slimmed model passes
the checker, is never larger, and its outputs equal the masked model's within 1e-5 x max|output| (fp32).

The examples are derandomized (a fixed seed) so CI is reproducible; ``tools/fuzz_slim.py`` runs long
campaigns with any seed.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from random_graphs import HypothesisDraw, build_random_model, check_example, check_prune_example


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_random_graphs_slim_exactly(data):
    model, _ = build_random_model(HypothesisDraw(data))
    outcome, detail, _ = check_example(model)
    assert outcome == "ok", f"{outcome}: {detail}"


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_random_graphs_prune_exactly_within_budget(data):
    """prune on the same graphs: the slimmed model equals its masked reference; no layer overshoots."""
    draw = HypothesisDraw(data)
    model, _ = build_random_model(draw)
    outcome, detail, _ = check_prune_example(model, draw.choice([0.3, 0.5, 0.7], "ratio"),
                                             draw.choice(["layer", "global"], "scope"))
    assert outcome == "ok", f"{outcome}: {detail}"


def test_fuzz_tool_prints_its_figures():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(root / "tools" / "fuzz_slim.py"), "--examples", "4", "--seed", "3",
                           "--prune", "0.5"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "examples: 4  ok: 4  crashes: 0  inexact: 0" in done.stdout
