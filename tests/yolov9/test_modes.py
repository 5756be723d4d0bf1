"""set_eval / restore_modes: ``model.eval()``'s result, touching only what trains, and undone exactly."""
from __future__ import annotations

import copy

from torch import nn

from fxrewrite.yolov9.inputs import restore_modes, set_eval


class KeepsProbeTraining(nn.Module):
    """A block whose own ``train`` keeps one submodule in training mode (and counts its calls)."""

    calls = 0

    def __init__(self):
        super().__init__()
        self.conv, self.probe = nn.Conv2d(2, 2, 1), nn.Sequential(nn.BatchNorm2d(2), nn.ReLU())

    def train(self, mode: bool = True):
        type(self).calls += 1
        super().train(mode)
        self.probe.train(True)
        return self


class OwnEval(nn.Sequential):
    evals = 0

    def eval(self):
        type(self).evals += 1
        return super().eval()


def tree() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 2, 1), KeepsProbeTraining(), nn.Sequential(nn.BatchNorm2d(2), KeepsProbeTraining()))


def flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_set_eval_gives_model_evals_modes_and_restore_modes_undoes_it():
    model = tree().train()
    before = flags(model)
    reference = copy.deepcopy(model).eval()
    modes = set_eval(model)
    assert flags(model) == flags(reference) and flags(model).count(True) == 6  # each block kept its probe (3 modules) training
    assert list(modes) == list(model.modules()) and all(modes.values())  # every module was training
    restore_modes(model, modes)
    assert flags(model) == before


def test_set_eval_switches_a_block_with_its_own_train_through_it_and_nothing_already_in_eval_mode():
    model = tree().train()
    KeepsProbeTraining.calls = 0
    set_eval(model)
    assert KeepsProbeTraining.calls == 2
    model = tree().eval()  # as loaded: already in eval mode (the probes too)
    for m in model.modules():
        m.training = False
    KeepsProbeTraining.calls = 0
    assert set_eval(model) == {} and KeepsProbeTraining.calls == 0 and not any(flags(model))


def test_a_model_with_its_own_eval_is_switched_through_it():
    model = OwnEval(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)).train()
    OwnEval.evals = 0
    modes = set_eval(model)
    assert OwnEval.evals == 1 and not any(flags(model)) and len(modes) == 3


def test_modules_are_switched_in_the_order_model_eval_switches_them():
    # `probe` is shared: KeepsProbeTraining (first) switches it on, then eval reaches it as a child itself
    class KeepsItsProbe(nn.Module):
        def __init__(self, probe):
            super().__init__()
            self.probe = probe

        def train(self, mode: bool = True):
            super().train(mode)
            self.probe.train(True)
            return self

    probe = nn.BatchNorm2d(2)
    model = nn.Sequential(KeepsItsProbe(probe), probe).train()
    reference = copy.deepcopy(model).eval()
    set_eval(model)
    assert flags(model) == flags(reference) == [False, False, False]


def test_a_train_set_on_the_module_itself_is_used_too():
    probe = nn.BatchNorm2d(2)
    inner = nn.Sequential(probe)
    inner.train = lambda mode=True: (nn.Module.train(inner, mode), probe.train(True))[0]
    model = nn.Sequential(inner).train()
    set_eval(model)
    assert (model.training, inner.training, probe.training) == (False, False, True)  # as model.eval() leaves them


def test_restore_modes_also_undoes_what_a_blocks_own_train_switched_on():
    model = nn.Sequential(KeepsProbeTraining()).train()
    probe = model[0].probe
    probe.eval()  # the user froze it
    before = flags(model)
    restore_modes(model, set_eval(model))
    assert flags(model) == before and not probe.training
