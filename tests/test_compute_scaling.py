"""Compute that scales (issue 24 part 3): the calibration forward stops after the last targeted module (the LM
head never runs), and init decomposes each unique input once (q/k/v and gate/up share one eigh / damped
inverse), with statistics and adapters bit-identical to the full computation."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lnull import activations, calibrate
from lnull.testing import counting_head_calls

BUDGETS = {"one group": "null", "eight groups": "0.00004"}  # GiB; the tiny model's 8 unique inputs, one a group


def _calibrate(tiny_cfg, out: Path, budget: str, monkeypatch, full_forward: bool) -> tuple[Path, int]:
    """Calibrate into ``out``; ``full_forward`` runs the forward to the logits on every pass (as before the
    stop: no head guard, no stop after the last group). Returns (out, LM head calls)."""
    calls = [0]
    with monkeypatch.context() as patch:
        patch.setattr(calibrate, "load_model", counting_head_calls(calibrate.load_model, calls))
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


@pytest.fixture(scope="module")
def tiny_calibration(tmp_path_factory):
    from lnull.cli import compose

    root = tmp_path_factory.mktemp("scaling")
    (root / "calibration").mkdir()
    calibrate.collect_into(compose(["+experiment=tiny", f"run.dir={root / 'run'}", "progress=false"]),
                           root / "calibration")
    return root


@pytest.mark.parametrize("method", ["lora_null_v2", "corda_kpm"])
def test_one_decomposition_per_unique_input_with_identical_adapters(method, tiny_calibration, tmp_path, monkeypatch):
    import contextlib

    from lnull import initialize
    from lnull.cli import compose
    from lnull.methods import corda, linalg

    counts = {"eigh": 0, "inverse": 0}
    eigh, inverse = linalg._eigh64, corda._damped_inverse

    def count(kind, fn):
        def wrapped(*args):
            counts[kind] += 1
            return fn(*args)
        return wrapped

    monkeypatch.setattr(linalg, "_eigh64", count("eigh", eigh))
    monkeypatch.setattr(corda, "_damped_inverse", count("inverse", inverse))
    cfg = compose(["+experiment=tiny", f"run.dir={tmp_path / 'run'}", "progress=false", f"method={method}"])
    layers = 2  # the tiny model: 7 targeted modules, 4 unique inputs (qkv, o, gate/up, down) per layer

    def build(name: str) -> dict[str, torch.Tensor]:
        counts.update(eigh=0, inverse=0)
        out = tmp_path / name
        out.mkdir()
        with warnings.catch_warnings():  # the tiny C's null space is degenerate (RankDeficientWarning)
            warnings.simplefilter("ignore")
            initialize.build(cfg, out, tiny_calibration / "calibration")
        return load_file(str(out / "adapter" / "adapter_model.safetensors"))

    shared = build("shared")
    kind = "eigh" if method.startswith("lora_null") else "inverse"
    assert counts == {"eigh": 0, "inverse": 0, kind: 4 * layers}
    with monkeypatch.context() as patch:  # the comparison run: no scope, one decomposition per module
        patch.setattr(initialize, "shared_decompositions", contextlib.nullcontext)
        separate = build("separate")
    assert counts[kind] == 7 * layers
    assert shared.keys() == separate.keys()
    for key in shared:
        assert torch.equal(shared[key], separate[key]), key  # bit-identical adapters and residual bases


def test_memo_holds_one_input_and_nothing_outside_a_scope():
    from lnull.methods import linalg

    calls = []
    C, D = torch.eye(3), torch.eye(3)

    def compute(tag):
        return lambda: calls.append(tag) or tag

    linalg.memoised(C, "k", compute("C0"))
    linalg.memoised(C, "k", compute("C1"))
    assert calls == ["C0", "C1"]  # outside a scope nothing is kept
    with linalg.shared_decompositions():
        assert [linalg.memoised(t, "k", compute(n)) for t, n in ((C, "C"), (C, "C'"), (D, "D"), (C, "C2"))] \
            == ["C", "C", "D", "C2"]  # the same object reuses; another input drops the previous one
        C.mul_(2)  # modified in place: recomputed
        assert linalg.memoised(C, "k", compute("C3")) == "C3"
        assert linalg.memoised(C, "other", compute("C4")) == "C4"  # another decomposition of the same input
        linalg.release_shared()
        assert linalg.memoised(C, "k", compute("C5")) == "C5"
        with torch.inference_mode():
            E = torch.eye(3)
        assert [linalg.memoised(E, "k", compute(n)) for n in ("E0", "E1")] == ["E0", "E1"]  # no version: not kept
    assert calls == ["C0", "C1", "C", "D", "C2", "C3", "C4", "C5", "E0", "E1"]


def test_length_grouped_micro_batches_give_the_micro_batch_one_loss_and_gradient():
    """``step_plan(group_by_length)`` + right-padded ``collate`` + training's ``ResponseLoss``: micro-batches of 4
    give micro-batch 1's loss and gradient per optimizer step (ResponseLoss averages each example's token mean;
    a loss pooling the micro-batch's tokens, HF's, does not)."""
    import torch.nn.functional as F

    from lnull.data.prompts import IGNORE_INDEX
    from lnull.modeling import load_model, resolve_model
    from lnull.tiny import TINY_ID
    from lnull.training.data import collate, step_plan
    from lnull.training.model import ResponseLoss

    model = load_model(resolve_model(TINY_ID))
    model.train()
    response_loss = ResponseLoss(model)
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (5, 9, 14, 20, 27, 33, 40, 61):
        ids = torch.randint(3, 500, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 2] = IGNORE_INDEX
        examples.append({"input_ids": ids, "labels": labels})
    lengths = [len(e["input_ids"]) for e in examples]

    def pooled(batch) -> torch.Tensor:
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        return F.cross_entropy(model.get_output_embeddings()(hidden[:, :-1][keep]).float(), targets[keep])

    def step(micro: int, loss_fn) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        plan = step_plan(lengths, 0, {"batch_size": 8, "micro_batch_size": micro, "seed": 0, "group_by_length": True})
        assert sorted(i for idx in plan for i in idx) == list(range(8)) and {len(idx) for idx in plan} == {micro}
        total = 0.0
        for idx in plan:  # as Accelerate's accumulation: each micro-batch's loss / micro-batches per step
            loss = loss_fn(**collate([examples[i] for i in idx], 0)) / len(plan)
            loss.backward()
            total += float(loss)
        return total, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()

    loss_one, one = step(1, response_loss)
    rel = lambda g: float((g - one).norm() / one.norm())  # noqa: E731
    loss_four, four = step(4, response_loss)
    assert loss_four == pytest.approx(loss_one, rel=1e-6) and rel(four) < 1e-5
    assert rel(step(4, lambda **b: pooled(b))[1]) > 0.05  # HF's pooled token mean moves the gradient


def test_response_loss_takes_its_positions_from_the_host_and_matches_the_mask():
    """The loop passes ``ResponseLoss.response_index`` computed on the host (no per-micro-step device sync): the
    loss equals the one computed from the labels alone, and the per-example mean of the boolean-mask selection
    (the definition) to float rounding; the positions are those whose next-token label is a response token."""
    import torch.nn.functional as F

    from lnull.data.prompts import IGNORE_INDEX
    from lnull.modeling import load_model, resolve_model
    from lnull.tiny import TINY_ID
    from lnull.training.data import collate
    from lnull.training.model import ResponseLoss

    model = load_model(resolve_model(TINY_ID))
    g = torch.Generator().manual_seed(3)
    examples = []
    for n, prompt in ((7, 3), (12, 10), (20, 4)):
        ids = torch.randint(3, 500, (n,), generator=g)
        labels = ids.clone()
        labels[:prompt] = IGNORE_INDEX
        examples.append({"input_ids": ids, "labels": labels})
    batch = collate(examples, 0)
    index = ResponseLoss.response_index(batch["labels"])
    width = batch["labels"].shape[1]
    assert index["response_positions"].tolist() == [i * width + j for i, (n, p) in enumerate(((7, 3), (12, 10), (20, 4)))
                                                    for j in range(p - 1, n - 1)]
    with torch.no_grad():
        given = ResponseLoss(model)(**batch, **index)
        derived = ResponseLoss(model)(**batch)
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        targets = batch["labels"][:, 1:]
        means = [F.cross_entropy(model.get_output_embeddings()(hidden[i, :-1][targets[i] != IGNORE_INDEX]).float(),
                                 targets[i][targets[i] != IGNORE_INDEX]) for i in range(3)]
    assert torch.equal(given, derived)
    assert float(given) == pytest.approx(float(torch.stack(means).mean()), rel=1e-6)
