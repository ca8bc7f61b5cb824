"""Arguments of the wrong kind, across the public functions: a TypeError naming the argument,
raised before anything changes. Each case was accepted (or failed inside torch) before."""

import pytest
import torch
from torch import nn

import signmask
from signmask import analysis
from _util import assert_same, snapshot, tiny


def _ticket():
    return signmask.extract(signmask.prune(tiny(0), 0.5))


def _opt(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


CASES = {
    "load_state_dict strict": (lambda m: signmask.load_state_dict(m, signmask.prune(tiny(0), 0.5).state_dict(), strict="False"),
                               "strict must be a bool, got str 'False'"),
    "apply progress": (lambda m: signmask.apply(m, "imp", 0.5, optimizer=_opt(m), progress="False"),
                       "progress must be a bool, got str 'False'"),
    "set_backend optimizer": (lambda m: signmask.set_backend(m, "torch", optimizer="adam"),
                              "optimizer must be a torch.optim.Optimizer or None, got str"),
    "random_prune check_architecture": (lambda m: analysis.random_prune(_ticket(), m, seed=0, check_architecture=None),
                                        "check_architecture must be a bool, got NoneType None"),
    "random_reinit ticket": (lambda m: analysis.random_reinit(None, m), r"random_reinit\(\) takes a Ticket or a path as ticket"),
    "random_prune ticket": (lambda m: analysis.random_prune(3, m, seed=0), r"random_prune\(\) takes a Ticket or a path as ticket"),
    "evaluate loader": (lambda m: analysis.evaluate(m, None), "loader must be an iterable of batches, got NoneType"),
    "reestimate_bn loader": (lambda m: analysis.reestimate_bn(m, None), "loader must be an iterable of batches, got NoneType"),
    "perturb names": (lambda m: analysis.perturb(m, "permute_layer", seed=0, names=3), "names must be an iterable of tensor names, got int 3"),
    "Telemetry keep_snapshots": (lambda m: analysis.Telemetry(m, keep_snapshots="False"), "keep_snapshots must be a bool, got str"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_wrong_kind_of_argument_is_named_and_nothing_changes(case):
    call, message = CASES[case]
    model = tiny(1)
    before = snapshot(model)
    with pytest.raises(TypeError, match=message):
        call(model)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("path", [None, 3, ""])
def test_save_and_load_name_a_path_that_is_no_path(path, tmp_path):
    with pytest.raises(TypeError, match="path must be a non-empty str or os.PathLike"):
        signmask.save(_ticket(), path)
    with pytest.raises(TypeError, match="path must be a non-empty str or os.PathLike"):
        signmask.load(path)


def test_plots_and_equal_width_name_their_arguments(tmp_path):
    with pytest.raises(TypeError, match="curves must be a mapping of label -> data, got NoneType"):
        analysis.plot_sparsity_accuracy(None, tmp_path / "s.png")
    with pytest.raises(TypeError, match="barriers must be a mapping of label -> data, got int"):
        analysis.plot_interpolation(3, tmp_path / "b.png")
    with pytest.raises(TypeError, match="device must be a torch.device or a device string, got 'bogus'"):
        analysis.equal_width(lambda w: nn.Linear(4, w), 20, [1, 2], device="bogus")
    with pytest.raises(TypeError, match="path must be a non-empty str or os.PathLike, got NoneType"):
        analysis.plot_sparsity_accuracy({"a": [(0.5, 0.5)]}, None)  # as save/load say it
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_numpy_and_tensor_forms_of_the_right_kind_are_taken():
    # The checks above must not refuse what the old code took: numpy bools, integer tensors as
    # seeds, one tensor name as a string, a loss already turned into a float.
    np = pytest.importorskip("numpy")
    model = signmask.prune(tiny(0), 0.5, method="random", seed=torch.tensor(3))
    twin = signmask.prune(tiny(0), 0.5, method="random", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    assert signmask.extract(model, dense=np.True_).signs.keys() == signmask.extract(model, dense=True).signs.keys()
    analysis.perturb(model, "permute_layer", seed=np.int64(0), names="conv1.weight")
    data = [(torch.randn(2, 3, 6, 6), torch.tensor([0, 1]))]
    as_float = analysis.evaluate(model, data, loss_fn=lambda y, t: nn.functional.cross_entropy(y, t).item())
    assert as_float == analysis.evaluate(model, data)
    with pytest.raises(TypeError, match="dense must be a bool, got numpy.float64"):
        signmask.extract(model, dense=np.float64(1.0))
    net = tiny(1)  # apply takes classifier= as prune does
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    signmask.apply(net, "lrr", 0.5, optimizer=opt, classifier=np.True_, progress=False)
    assert hasattr(net.fc, "weight_mask")


# ---------------------------------- analysis._common: behaviour pinned by mutation testing


def test_a_loader_with_only_getitem_is_taken():
    # the old sequence protocol (__getitem__ until IndexError) iterates like a list
    data = [(torch.randn(2, 3, 6, 6), torch.tensor([0, 1]))]

    class Indexed:
        def __getitem__(self, i):
            return data[i]

    model = tiny(0)
    assert analysis.evaluate(model, Indexed()) == analysis.evaluate(model, data)


def test_same_names_names_the_tensors_missing_on_either_side():
    from signmask.analysis._common import same_names

    same_names({"a": 0, "b": 0}, {"b": 1, "a": 1}, "x", "y")
    with pytest.raises(ValueError, match=r"only in x: \[\], only in y: \['c'\]"):
        same_names({"a": 0}, {"a": 0, "c": 0}, "x", "y")


def test_device_of_a_model_with_buffers_only_is_their_device():
    from signmask.analysis._common import device_of

    assert device_of(nn.BatchNorm1d(3, affine=False).to("meta")) == torch.device("meta")
    assert device_of(nn.ReLU()) == torch.device("cpu")
