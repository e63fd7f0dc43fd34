"""Training MIL heads on a small synthetic problem: accuracy, masking, attention,
calibration, determinism, the saved file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mil_problem import MilProblem, hide, make_problem

from services.analysis.metrics import auroc
from services.common.errors import InvalidInput
from services.common.vocabulary import BIOMARKERS
from services.mil.bags import Bag, read_bag, write_bag
from services.mil.calibration import MAX_TEMPERATURE, MIN_TEMPERATURE, sigmoid
from services.mil.heads import build_head
from services.mil.model import FittedMIL, TrainingData
from services.mil.train import masked_bce, train_mil

SETTINGS = {
    "abmil": {"head_options": {"hidden_dim": 32, "attention_dim": 16}, "lr": 5e-3, "epochs": 12},
    "transmil": {
        "head_options": {"hidden_dim": 32, "heads": 2, "layers": 2, "dropout": 0.0},
        "lr": 1e-3,
        "epochs": 14,
    },
}
DATA = TrainingData(cohort="mil-unit", synthetic=True, sites=("SA", "SB"), n_slides=136)


@pytest.fixture(scope="module")
def problem() -> tuple[MilProblem, MilProblem, MilProblem]:
    """(train, validation, test)."""
    return make_problem(96, 1), make_problem(40, 2), make_problem(48, 3)


@pytest.fixture(scope="module", params=["abmil", "transmil"])
def fitted(request: pytest.FixtureRequest, problem: tuple[MilProblem, ...]) -> FittedMIL:
    train, val, _ = problem
    epochs: list[tuple[int, int]] = []
    model = train_mil(
        train.bags,
        hide(train.labels, 0.2, seed=0),
        val.bags,
        hide(val.labels, 0.1, seed=1),
        head=request.param,
        patience=6,
        seed=0,
        threads=1,
        progress=lambda done, total: epochs.append((done, total)),
        data=DATA,
        **SETTINGS[request.param],
    )
    ran = len(model.training["history"])
    assert epochs == [(e, SETTINGS[request.param]["epochs"]) for e in range(1, ran + 1)]
    return model


def test_held_out_auroc_is_high_for_every_task(
    fitted: FittedMIL, problem: tuple[MilProblem, ...]
) -> None:
    test = problem[2]
    probabilities = fitted.predict_many(test.bags)
    assert fitted.tasks == BIOMARKERS
    for t, task in enumerate(fitted.tasks):
        score = auroc(test.labels[:, t], probabilities[:, t])
        assert score > 0.9, f"{fitted.head_name} {task}: AUROC {score:.3f}"


# Only the gated-attention head: the transformer's class tokens attend to tokens that
# the first layer has already mixed, so its maps are not meant to single out instances.
@pytest.mark.parametrize("fitted", ["abmil"], indirect=True)
def test_abmil_attention_finds_the_planted_instances(
    fitted: FittedMIL, problem: tuple[MilProblem, ...]
) -> None:
    test = problem[2]
    hits = []
    for i, bag in enumerate(test.bags):
        attention = fitted.predict_bag(bag).attention
        for t, task in enumerate(fitted.tasks):
            if test.labels[i, t]:
                hits.append(int(np.argmax(attention[task])) in test.planted[i][t])
    assert np.mean(hits) > 0.85


def test_temperature_scaling_never_raises_validation_nll(fitted: FittedMIL) -> None:
    assert [c.task for c in fitted.calibration] == list(BIOMARKERS)
    for c, temperature in zip(fitted.calibration, fitted.temperatures, strict=True):
        assert c.temperature == temperature
        assert c.nll_after <= c.nll_before
        assert MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE
        assert c.n == int((~np.isnan(fitted.validation_labels[:, BIOMARKERS.index(c.task)])).sum())
    assert any(c.fitted for c in fitted.calibration)


def test_calibrated_probabilities_are_the_logits_over_temperature(
    fitted: FittedMIL, problem: tuple[MilProblem, ...]
) -> None:
    bag = problem[2].bags[0]
    call = fitted.predict_bag(bag)
    for t, task in enumerate(fitted.tasks):
        expected = sigmoid(np.array(call.logits[task]), fitted.temperatures[t])
        assert call.probabilities[task] == pytest.approx(float(expected))
        assert call.attention[task].shape == (len(bag),)


def test_save_and_load_give_identical_calls_and_the_model_card(
    fitted: FittedMIL, problem: tuple[MilProblem, ...], tmp_path: Path
) -> None:
    path = fitted.save(tmp_path / "mil.pt")
    loaded = FittedMIL.load(path)
    for bag in problem[2].bags[:5]:
        a, b = fitted.predict_bag(bag), loaded.predict_bag(bag)
        assert a.probabilities == b.probabilities
        for task in fitted.tasks:
            np.testing.assert_array_equal(a.attention[task], b.attention[task])
    card = loaded.model_card()
    assert card == fitted.model_card()
    assert card["training_data"]["cohort"] == "mil-unit"
    assert card["training_data"]["synthetic"] is True
    assert card["training_data"]["sites"] == ["SA", "SB"]
    assert card["training_data"]["train_bags"] == 96
    assert card["head"]["name"] == fitted.head_name
    # The file holds nothing but plain types and tensors.
    torch.load(path, weights_only=True)
    png = loaded.reliability_diagrams(tmp_path / "reliability")
    assert set(png) == set(BIOMARKERS)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in png.values())


def test_masked_entries_add_nothing_to_loss_or_gradient() -> None:
    labels = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), 1.0, float("nan")]])
    logits = torch.tensor([[2.0, -1.0, 0.5], [3.0, 0.2, -4.0]], requires_grad=True)
    loss = masked_bce(logits, labels)
    loss.backward()
    assert logits.grad is not None
    grad = logits.grad.clone()
    # Change only the masked logits (even to NaN): same loss, same gradient.
    other = logits.detach().clone()
    other[torch.isnan(labels)] = torch.tensor([float("nan"), 100.0, -7.0])
    other.requires_grad_(True)
    again = masked_bce(other, labels)
    again.backward()
    assert other.grad is not None
    assert again.item() == pytest.approx(loss.item())
    torch.testing.assert_close(other.grad, grad)
    assert (grad[torch.isnan(labels)] == 0).all()
    # And it is the mean BCE over the known entries only.
    known = ~torch.isnan(labels)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.detach()[known], labels[known]
    )
    assert loss.item() == pytest.approx(expected.item())
    assert masked_bce(logits, torch.full_like(labels, float("nan"))).item() == 0.0


def test_training_is_deterministic_given_the_seed() -> None:
    data = make_problem(16, 7)
    labels = hide(data.labels, 0.3, seed=2)

    def fit() -> FittedMIL:
        return train_mil(
            data.bags[:12],
            labels[:12],
            data.bags[12:],
            data.labels[12:],
            epochs=2,
            lr=1e-3,
            seed=3,
            head_options={"hidden_dim": 8, "attention_dim": 4},
        )

    a, b = fit(), fit()
    for (name, x), (_, y) in zip(
        a.head.state_dict().items(), b.head.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name
    assert a.training["history"] == b.training["history"]


def test_a_task_without_known_labels_leaves_its_own_weights_untouched() -> None:
    data = make_problem(16, 8)
    labels = data.labels.copy()
    labels[:, 5] = np.nan  # basal unknown everywhere
    torch.manual_seed(4)
    initial = build_head("abmil", 16, 6, hidden_dim=8, attention_dim=4).state_dict()
    model = train_mil(
        data.bags[:12],
        labels[:12],
        data.bags[12:],
        labels[12:],
        epochs=3,
        lr=1e-2,
        weight_decay=0.0,  # decoupled decay would move even weights without gradient
        seed=4,
        head_options={"hidden_dim": 8, "attention_dim": 4},
    )
    trained = model.head.state_dict()
    for name in ("classify.weight", "classify.bias", "attention_w.weight", "attention_w.bias"):
        torch.testing.assert_close(trained[name][5], initial[name][5], rtol=0, atol=0)
        assert not torch.equal(trained[name][0], initial[name][0]), name
    basal = model.calibration[5]
    assert (basal.n, basal.fitted, basal.temperature) == (0, False, 1.0)


def test_bags_from_files_carry_their_encoder_into_the_model(tmp_path: Path) -> None:
    data = make_problem(12, 4)
    bags = []
    for i, x in enumerate(data.bags):
        coords = np.zeros((len(x), 2), np.int64)
        path = write_bag(
            tmp_path / f"{i}.h5",
            x,
            coords,
            slide_id=f"SYN-SA-{i:04d}-01Z-00-DX1",
            encoder="tiny",
            encoder_sha256="cd" * 32,
            patch_px=224,
            patch_mpp=0.5,
            level0_mpp=0.25,
        )
        bags.append(read_bag(path))
    model = train_mil(
        bags[:8],
        data.labels[:8],
        bags[8:],
        data.labels[8:],
        epochs=1,
        head_options={"hidden_dim": 8},
    )
    assert (model.encoder, model.encoder_sha256) == ("tiny", "cd" * 32)
    model.predict(bags[0])
    foreign = Bag(**{**bags[0].__dict__, "encoder": "uni"})
    with pytest.raises(InvalidInput, match="holds uni embeddings; this model reads tiny"):
        model.predict(foreign)
    other_weights = Bag(**{**bags[0].__dict__, "encoder_sha256": "ef" * 32})
    with pytest.raises(InvalidInput, match="other tiny weights"):
        model.predict(other_weights)
    with pytest.raises(InvalidInput, match="different encoders"):
        train_mil(bags[:8], data.labels[:8], [foreign], data.labels[:1], epochs=1)


def test_bad_training_inputs_are_refused() -> None:
    data = make_problem(6, 5)
    with pytest.raises(InvalidInput, match=r"train_labels must be \(6 bags, 6 tasks\)"):
        train_mil(data.bags, data.labels[:5], data.bags, data.labels)
    with pytest.raises(InvalidInput, match="no known training label"):
        train_mil(data.bags, np.full_like(data.labels, np.nan), data.bags, data.labels)
    with pytest.raises(InvalidInput, match="1, 0 or NaN"):
        train_mil(data.bags, data.labels * 2, data.bags, data.labels)
    with pytest.raises(InvalidInput, match="differ in width"):
        train_mil(data.bags, data.labels, [b[:, :4] for b in data.bags], data.labels)
    with pytest.raises(InvalidInput, match="min_instance_keep"):
        train_mil(data.bags, data.labels, data.bags, data.labels, min_instance_keep=0.0)


def test_a_5000_patch_bag_is_called_from_file_quickly(tmp_path: Path) -> None:
    """Bag file -> six calibrated calls with the default-size head (timed in the
    README of the task, not asserted here)."""
    torch.manual_seed(0)
    head = build_head("abmil", 1024, len(BIOMARKERS))
    model = FittedMIL(
        head=head,
        head_name="abmil",
        head_options={},
        in_dim=1024,
        tasks=BIOMARKERS,
        temperatures=(0.5, 1.0, 1.5, 2.0, 3.0, 0.8),
        encoder="uni",
        encoder_sha256="",
    )
    saved = FittedMIL.load(model.save(tmp_path / "mil.pt"))
    rng = np.random.default_rng(0)
    features = rng.normal(size=(5000, 1024)).astype(np.float32)
    coords = rng.integers(0, 90_000, (5000, 2))
    path = write_bag(
        tmp_path / "slide.h5",
        features,
        coords,
        slide_id="SYN-SA-0001-01Z-00-DX1",
        encoder="uni",
        encoder_sha256="",
        patch_px=224,
        patch_mpp=0.5,
        level0_mpp=0.25,
    )
    calls = saved.predict(read_bag(path))
    assert list(calls) == list(BIOMARKERS)
    with torch.inference_mode():
        logits = head.eval()(torch.from_numpy(features)).logits.double().numpy()
    expected = sigmoid(logits / np.array(saved.temperatures))
    np.testing.assert_allclose([calls[t] for t in BIOMARKERS], expected, rtol=1e-5)
    assert all(0.0 < p < 1.0 for p in calls.values())
