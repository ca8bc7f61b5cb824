"""The examples under examples/ run (quick versions) and do what their docstrings say.

Each example is imported from its file and its ``main(argv)`` run in-process with ``--quick``;
``signmask.apply`` is wrapped so the test can watch the user's optimizer from outside the
example's loop (rewind point, restarts, masks, the AWS interpolation) without changing it.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import signmask
from signmask import _interpolate

from _util import since_timm

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    if str(EXAMPLES) not in sys.path:  # the examples import their shared `_data` from beside them
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"signmask_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spy_apply(monkeypatch, on_apply):
    """Wrap ``signmask.apply``; ``on_apply(model, search, optimizer)`` runs before any training."""
    real = signmask.apply

    def wrapper(model, *args, **kwargs):
        search = real(model, *args, **kwargs)
        on_apply(model, search, kwargs["optimizer"])
        return search

    monkeypatch.setattr(signmask, "apply", wrapper)


def weights_of(model: nn.Module, classifier: bool) -> dict[str, int]:
    """numel of every conv/linear weight a search prunes (the last Linear only if ``classifier``)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    last_linear = [n for n, m in layers.items() if isinstance(m, nn.Linear)][-1]
    return {f"{n}.weight": m.weight.numel() for n, m in layers.items() if classifier or n != last_linear}


def expected_sparsities(total: int, sparsity: float, rate: float, rounds: int) -> list[float]:
    """1 - kept/total per round: dense, then round(total * (1-rate)^i), the last exactly at the target."""
    kept = [total] + [round(total * (1 - rate) ** i) for i in range(1, rounds)] + [round(total * (1 - sparsity))]
    return [1 - k / total for k in kept]


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("weight_mask")}


def check_ticket(path: Path, numels: dict[str, int], sparsity: float, method: str) -> signmask.Ticket:
    ticket = signmask.load(path)
    total = sum(numels.values())
    assert {k: v.numel() for k, v in ticket.masks.items()} == numels
    assert ticket.kept == round(total * (1 - sparsity))  # counted from the saved masks
    assert ticket.metadata["method"] == method
    return ticket


def only_round_lines(out: str, method: str) -> bool:
    """Whether the search's log lines are all the loop printed from its first round to its last: a
    print inside a round lands on that round's progress bar in a terminal."""
    lines = out.splitlines()
    logged = [i for i, line in enumerate(lines) if line.startswith(f"{method} round ")]
    return bool(logged) and all(line.startswith(f"{method} round ") for line in lines[logged[0]:logged[-1] + 1])


@since_timm("1.0.10", "test_resnet")
def test_prune_save_transfer_carries_the_signed_mask(tmp_path, capsys):
    ex = load_example("prune_save_transfer")
    path = tmp_path / "t.safetensors"
    assert ex.main(["--arch", "test_resnet", "--out", str(path)]) is True
    ticket = signmask.load(path)
    # global pruning of the masked (non-classifier) weights: exactly round(0.8 * N) go
    assert ticket.numel - ticket.kept == round(0.8 * ticket.numel)
    assert ticket.metadata["architecture"] == "test_resnet"
    assert "new init carries the ticket's signed mask: True" in capsys.readouterr().out


def test_imp_example_refuses_fewer_epochs_than_its_rewind_needs(capsys):
    ex = load_example("imp_rewind_plain_loop")
    with pytest.raises(SystemExit) as exc:
        ex.parse_args(["--quick", "--epochs", "1"])
    assert exc.value.code == 2 and "--epochs must be >= 2 with the rewind to epoch 1, got 1" in capsys.readouterr().err


def test_imp_rewinds_weights_and_schedule_to_epoch_1(tmp_path, monkeypatch):
    ex = load_example("imp_rewind_plain_loop")
    seen = {"step": 0, "first": {}}
    steps_per_epoch = 512 // 32  # --quick: 512 images, batches of 32

    def on_apply(model, search, opt):
        seen["model"] = model

        def pre(opt, args, kwargs):
            if search.round == 0 and seen["step"] == steps_per_epoch:
                seen["lr_at_rewind_point"] = opt.param_groups[0]["lr"]  # set by sched.step() after epoch 1
            if search.round_step == 0:  # weights as the round starts (forward/backward change none)
                seen["first"][search.round] = {
                    "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                    "lr": opt.param_groups[0]["lr"],
                    "momentum": sum(len(s) for s in opt.state.values()),
                    "masks": masks_of(model),
                }

        def post(opt, args, kwargs):
            seen["step"] += 1
            if seen["step"] == steps_per_epoch:
                seen["rewind"] = {n: p.detach().clone() for n, p in model.named_parameters()}

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)

    spy_apply(monkeypatch, on_apply)
    results = ex.main(["--quick", "--data", "synthetic", "--out", str(tmp_path)])

    first, rewind = seen["first"], seen["rewind"]
    assert sorted(first) == list(range(9))  # 20% of the rest per round to 80%: 8 prunings
    # Every pruned round starts from the weights after epoch 1, not from the init.
    assert any(not torch.equal(first[0]["params"][n], rewind[n]) for n in rewind)
    for r in range(1, 9):
        assert first[r]["params"].keys() == rewind.keys()
        assert all(torch.equal(first[r]["params"][n], rewind[n]) for n in rewind), r
        # ... with the LR of the cosine schedule after epoch 1 (0.1 -> 0.05) and no momentum.
        assert first[r]["lr"] == seen["lr_at_rewind_point"] == pytest.approx(0.05)
        assert first[r]["momentum"] == 0
        # Masks only shrink.
        for n, m in first[r]["masks"].items():
            assert not (m & ~first[r - 1]["masks"][n]).any()
    assert first[1]["lr"] != first[0]["lr"]
    # Round 0 trains both epochs, the pruned rounds the epoch after the rewind point.
    assert [h["steps"] for h in results["rounds"]] == [2 * steps_per_epoch] + [steps_per_epoch] * 8

    numels = weights_of(ex.make_model(8), classifier=True)  # IMP prunes the classifier too
    total = sum(numels.values())
    assert [h["sparsity"] for h in results["rounds"]] == expected_sparsities(total, 0.8, 0.2, 8)
    assert [sum(int(m.sum()) for m in first[r]["masks"].values()) for r in range(9)] == \
        [round(total * (1 - s)) for s in expected_sparsities(total, 0.8, 0.2, 8)]
    assert all(0.0 <= h["acc"] <= 1.0 for h in results["rounds"])

    ticket = check_ticket(tmp_path / "ticket.safetensors", numels, 0.8, "imp")
    assert ticket.metadata["rewind"] == "1ep"
    final = masks_of(seen["model"])
    assert all(torch.equal(ticket.masks[k] != 0, final[k.replace(".weight", ".weight_mask")]) for k in numels)
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_imp_example_runs_as_a_script(tmp_path):
    env = {**os.environ, "SIGNMASK_EXAMPLES_QUICK": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "imp_rewind_plain_loop.py"), "--out", "out"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data: synthetic" in proc.stdout
    assert only_round_lines(proc.stdout, "imp") and "loss=" in proc.stdout
    logged = [line.split(",")[0].split() for line in proc.stdout.splitlines() if line.startswith("imp round")]
    assert [int(words[2].rstrip(":")) for words in logged] == list(range(9))
    sparsities = [float(words[-1].rstrip("%")) / 100 for words in logged]
    assert sparsities == pytest.approx([1 - 0.8 ** r for r in range(8)] + [0.8], abs=2e-4)
    assert signmask.load(tmp_path / "out" / "ticket.safetensors").sparsity == pytest.approx(0.8, abs=1e-3)


def test_aws_transfer_interpolates_then_transfers_the_signed_mask(tmp_path, monkeypatch, capsys):
    ex = load_example("aws_transfer")
    alphas = []

    def on_apply(model, search, opt):
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

        def pre(opt, args, kwargs):
            # bn.weight is what the last TRAINING forward used: lerp(trained, init, a), one a for all.
            found = []
            for bn in bns:
                orig, init = bn.weight_orig.detach(), bn.weight_init
                moved = (orig - init).abs() > 1e-3
                if moved.any():
                    a = (bn.weight.detach() - orig)[moved] / (init - orig)[moved]
                    found.append(a)
            if found:
                a = torch.cat(found)
                assert (a - a[0]).abs().max() < 1e-3
                alphas.append(float(a[0]))

        opt.register_step_pre_hook(pre)

    spy_apply(monkeypatch, on_apply)
    transferred = {}
    real_transfer = signmask.transfer

    def spy_transfer(ticket, model, **kwargs):
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        real_transfer(ticket, model, **kwargs)
        after = {n + ".weight": m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight_mask")}
        transferred[kwargs.get("signs", "init")] = (before, after)
        return model

    monkeypatch.setattr(signmask, "transfer", spy_transfer)
    results = ex.main(["--quick", "--data", "synthetic", "--out", str(tmp_path)])
    assert only_round_lines(capsys.readouterr().out, "aws")
    assert all(h["loss"] > 0 for h in results["rounds"])

    assert len(alphas) > 40 and all(0.0 <= a < 1.0 for a in alphas)
    assert len({round(a, 3) for a in alphas}) > len(alphas) // 2  # a new a per batch

    numels = weights_of(ex.make_model(8, 0), classifier=False)  # AWS keeps the classifier dense
    total = sum(numels.values())
    assert [h["sparsity"] for h in results["rounds"]] == expected_sparsities(total, 0.8, 0.5, 3)
    ticket = check_ticket(tmp_path / "ticket.safetensors", numels, 0.8, "aws")
    classifier = [f"{n}.weight" for n, m in ex.make_model(8, 0).named_modules() if isinstance(m, nn.Linear)]
    assert classifier and all(k in ticket.signs for k in classifier)  # the dense classifier's signs travel too

    # The saved retrained models carry exactly the ticket's binary mask and no interpolation.
    for signs in ("init", "keep"):
        state = torch.load(tmp_path / f"transfer_{signs}.pt")
        assert not [k for k in state if k.endswith("_init")]
        for k, signed in ticket.masks.items():
            mask = state[k.replace(".weight", ".weight_mask")]
            assert torch.equal(mask, signed != 0), (signs, k)
    table = results["table"]
    assert [row["sparsity"] for row in table] == [0.0] + [ticket.sparsity] * 4
    assert [row["acc"] for row in table[:2]] == [results["rounds"][0]["acc"], results["rounds"][-1]["acc"]]
    assert "signs='init'" in table[3]["model"] and "signs='keep'" in table[4]["model"]
    assert all(0.0 <= row["acc"] <= 1.0 for row in table)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    # Both runs start from the same new init (seed 1, not the search's): with signs="init" its kept
    # weights take the ticket's signs, |theta_new| * s; with signs="keep" they keep their own.
    assert sorted(transferred) == ["init", "keep"]
    new_init, search_init = ex.make_model(8, 1).state_dict(), ex.make_model(8, 0).state_dict()
    for signs, (before, after) in transferred.items():
        assert before.keys() == new_init.keys()
        assert all(torch.equal(before[k], new_init[k]) for k in new_init)
        assert any(not torch.equal(new_init[k], search_init[k]) for k in ticket.masks)
        assert after.keys() == ticket.masks.keys()
        for k, signed in ticket.masks.items():
            expected = before[k].abs() * signed if signs == "init" else before[k] * (signed != 0)
            assert torch.equal(after[k], expected), (signs, k)


def test_timm_ema_follows_the_search_and_the_schedule_restarts(tmp_path, monkeypatch, capsys):
    from signmask._compat import import_timm

    timm = import_timm()
    import timm.utils

    ex = load_example("timm_ema_loop")
    seen = {"first": {}, "lrs": {}}
    emas = []

    class RecordedEma(timm.utils.ModelEmaV3):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            emas.append(self)

    monkeypatch.setattr(timm.utils, "ModelEmaV3", RecordedEma)

    def on_apply(model, search, opt):
        seen["model"] = model
        real_close = search.close

        def close(*copies):  # the example's search.close(ema.module): were the copies interpolated?
            seen.setdefault("copies_interpolated", []).extend(bool(_interpolate.interpolated(c)) for c in copies)
            seen["trained_norms"] = {  # the EMA's averaged norm parameters, before close()
                (id(c), name, t): m._parameters[t + "_orig"].detach().clone()
                for c in copies for name, m in _interpolate.interpolated(c).items()
                for t in ("weight", "bias") if t + "_orig" in m._parameters
            }
            real_close(*copies)

        search.close = close

        def pre(opt, args, kwargs):
            lrs = [g["lr"] for g in opt.param_groups]
            seen["lrs"].setdefault(search.round, []).append(lrs)
            if search.round_step == 0:
                seen["first"][search.round] = sum(len(s) for s in opt.state.values())

        opt.register_step_pre_hook(pre)

    spy_apply(monkeypatch, on_apply)
    results = ex.main(["--quick", "--data", "synthetic", "--out", str(tmp_path)])
    assert only_round_lines(capsys.readouterr().out, "aws")
    assert all(h["loss"] > 0 for h in results["rounds"])
    lr = 0.05  # --lr default; warm-up starts at lr / 10

    lrs = seen["lrs"]
    assert sorted(lrs) == sorted(seen["first"]) == [0, 1, 2, 3]
    assert lrs[0][0] == pytest.approx([lr / 10] * len(lrs[0][0]))  # warm-up starts at lr / 10
    assert len({tuple(step) for step in lrs[0]}) > 1  # ... and the schedule moves within a round
    for r in (1, 2, 3):
        assert lrs[r] == lrs[0]  # every round runs the same schedule again, from its start
        assert seen["first"][r] == 0  # with the momentum reset

    model, (ema,) = seen["model"], emas
    numels = weights_of(model, classifier=False)
    total = sum(numels.values())
    assert "fc.weight" not in numels and "conv1.0.weight" in numels
    assert [h["sparsity"] for h in results["rounds"]] == expected_sparsities(total, 0.8, 0.5, 3)
    assert all(0.0 <= h["ema_acc"] <= 1.0 for h in results["rounds"])

    ticket = check_ticket(tmp_path / "ticket.safetensors", numels, 0.8, "aws")
    # The EMA copy averaged the pruned network: its masks are the model's, i.e. the ticket's.
    ema_masks, model_masks = masks_of(ema.module), masks_of(model)
    assert ema_masks.keys() == model_masks.keys() == {k.replace(".weight", ".weight_mask") for k in numels}
    for k, signed in ticket.masks.items():
        key = k.replace(".weight", ".weight_mask")
        assert torch.equal(ema_masks[key], signed != 0) and torch.equal(model_masks[key], signed != 0)
    # search.close(ema.module) took AWS's norm interpolation off the EMA copy, which still had it
    # after the search had ended (and detached the model): the EMA has the model's layout again.
    assert seen["copies_interpolated"] == [True]
    assert _interpolate.interpolated(ema.module) == {} and _interpolate.interpolated(model) == {}
    # ... and the EMA now evaluates those norm parameters themselves, not a blend with init
    norms = seen["trained_norms"]
    assert norms and all(key[0] == id(ema.module) for key in norms)
    modules = dict(ema.module.named_modules())
    for (_, name, t), value in norms.items():
        assert torch.equal(getattr(modules[name], t), value)
    assert not [k for k in ema.module.state_dict() if k.endswith("_init")]
    assert list(ema.module.state_dict()) == list(model.state_dict())
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_write_json_replaces_whole_and_leaves_no_temp_file_behind(tmp_path):
    write_json = load_example("_data").write_json
    target = tmp_path / "results.json"
    write_json(target, {"a": 1})
    write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(OSError):  # the rename fails (a non-empty folder is in the way)
        write_json(tmp_path / "busy", {"b": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "results.json"]
    assert json.loads(target.read_text()) == {"a": 2}
