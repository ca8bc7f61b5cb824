"""benchmarks/train_step.py: ``--compile`` times every variant compiled, and shows it did.

Dry preset, its MLP, one warm-up and one timed round, through ``aot_eager`` (no C++ build): the
counts come from dynamo and from the autograd graph, whichever backend compiles.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _common  # noqa: E402
import train_step  # noqa: E402

VARIANTS = ["dense", "prune", "torch", "projection"]


def _run(monkeypatch, tmp_path, *flags: str) -> tuple[dict, str]:
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--preset", "dry", "--models", "mlp",
                                      "--variants", *VARIANTS, "--steps", "1", "--warmup", "1",
                                      "--out", "run", *flags])
    train_step.main()
    return json.loads((tmp_path / "run.json").read_text()), (tmp_path / "run.md").read_text()


def test_every_variant_runs_compiled_past_a_recompile_limit_of_one(monkeypatch, tmp_path):
    # A limit of 1: without the script raising it, every variant after the first would compile
    # the same forward past the limit and run eagerly.
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=False):
        res, md = _run(monkeypatch, tmp_path, "--compile", "aot_eager")
    model = res["models"]["mlp"]
    assert model["errors"] == {}
    assert list(model["variants"]) == VARIANTS
    for v, r in model["variants"].items():
        assert r["compile"]["graphs"] == 1, v
        assert r["compile"]["graph_breaks"] == 0, v
        assert r["compile"]["graphs_run"] == 1, v
        assert r["compile"]["graphs_in_timed_rounds"] == 0, v
        assert r["compile"]["ops_captured"] > 0, v
    assert model["variants"]["dense"]["ratio_to_dense"] == 1.0
    assert res["compile"]["backend"] == "aot_eager"
    assert "torch.compile (aot_eager)" in md.splitlines()[0]
    assert "| graphs | breaks | graphs run | first s |" in md


def test_a_variant_left_eager_shows_no_graph_run(monkeypatch, tmp_path):
    # The negative control: the limit kept at 1, the variants after dense run eagerly, and the
    # counts say so.
    monkeypatch.setattr(_common, "configure_dynamo", lambda limit: None)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=False):
        res, _ = _run(monkeypatch, tmp_path, "--compile", "aot_eager")
    runs = {v: r["compile"]["graphs_run"] for v, r in res["models"]["mlp"]["variants"].items()}
    assert runs == {"dense": 1, "prune": 0, "torch": 0, "projection": 0}


def test_without_the_flag_nothing_is_compiled_or_recorded(monkeypatch, tmp_path):
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    res, md = _run(monkeypatch, tmp_path)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before
    assert "compile" not in res
    assert all("compile" not in r for r in res["models"]["mlp"]["variants"].values())
    assert md.splitlines()[0] == "# Training step at 90% sparsity (dry preset)"
    assert "graphs" not in md


def test_compile_refuses_no_warmup(monkeypatch, tmp_path):
    with pytest.raises(SystemExit):
        _run(monkeypatch, tmp_path, "--compile", "--warmup", "0")
