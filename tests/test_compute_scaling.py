"""Compute that scales (issue 24 part 3): the calibration forward stops after the last targeted module (the LM
head never runs), and init decomposes each unique input once (q/k/v and gate/up share one eigh / damped
inverse), with statistics and adapters bit-identical to the full computation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lnull import activations, calibrate

BUDGETS = {"one group": "null", "eight groups": "0.00004"}  # GiB; the tiny model's 8 unique inputs, one a group


def _calibrate(tiny_cfg, out: Path, budget: str, monkeypatch, full_forward: bool) -> tuple[Path, int]:
    """Calibrate into ``out``; ``full_forward`` runs the forward to the logits on every pass (as before the
    stop: no head guard, no stop after the last group). Returns (out, LM head calls)."""
    calls = [0]
    load = calibrate.load_model

    def counting_load(*args, **kwargs):
        model = load(*args, **kwargs)
        model.get_output_embeddings().register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        return model

    with monkeypatch.context() as patch:
        patch.setattr(calibrate, "load_model", counting_load)
        if full_forward:
            collector = activations.GroupCollector

            class FullForward(collector):
                def __init__(self, modules, acc, stop_after):
                    super().__init__(modules, acc, None)

            patch.setattr(activations, "GroupCollector", FullForward)
            patch.setattr(activations, "_stop_before_head", lambda *_: None)
        out.mkdir()
        calibrate.collect_into(tiny_cfg(f"calibration.device_budget_gb={budget}"), out)
    return out, calls[0]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("stats*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("budget", list(BUDGETS.values()), ids=list(BUDGETS))
def test_calibration_stops_before_the_head_with_identical_statistics(budget, tiny_cfg, tmp_path, monkeypatch):
    new, head_new = _calibrate(tiny_cfg, tmp_path / "new", budget, monkeypatch, full_forward=False)
    old, head_old = _calibrate(tiny_cfg, tmp_path / "old", budget, monkeypatch, full_forward=True)
    assert head_new == 0  # neither the alias probe nor any group's pass reaches the LM head
    assert head_old > 0  # the comparison run really ran the whole model
    meta = json.loads((new / "meta.json").read_text())
    assert meta["groups"] == (1 if budget == "null" else 8)
    assert meta == json.loads((old / "meta.json").read_text())
    ours, full = _tensors(new), _tensors(old)
    assert ours.keys() == full.keys() and len(ours) == 4 * meta["unique_inputs"]
    for key in ours:
        assert torch.equal(ours[key], full[key]), key  # bit-identical
