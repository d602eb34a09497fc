"""The experiments' analysis code (experiments/): the evaluation-noise table and the steering probe."""

from __future__ import annotations

import pytest
import torch

from experiments import eval_noise, steering_probe


def test_eval_noise_table_divides_each_candidates_signal_by_the_last_checkpoints_sd():

    def metrics(r5: float, loss: float) -> dict:
        suite = {
            "gallery:i2t_r@5": r5,
            "gallery:t2i_r@5": r5,
            "gallery:i2t_r@1": r5 / 2,
            "gallery:t2i_r@1": 0.0,
        }
        suite |= {"fewshot_mean:x": 0.1, "zeroshot_balanced:group": 0.2, "zeroshot_balanced:folder": 0.2}
        return {"emoji": suite, "openclipart": dict(suite), "icons": {"heldout_loss": loss}}

    full = {"a": metrics(0.05, 3.0), "b": metrics(0.17, 2.0)}
    draws = {"a": [metrics(0.04, 3.0), metrics(0.06, 3.0)], "b": [metrics(0.16, 2.1), metrics(0.18, 1.9)]}
    rows = {r.split("|")[1].strip(): r for r in eval_noise.choice_table(["a", "b"], full, draws)[2:]}
    # gallery_r5: 5 -> 17 points, sd of b's draws (16, 18) = 1.41: signal / sd 8.5
    assert rows["gallery_r5"] == "| gallery_r5 | 5.00 (1.41) | 17.00 (1.41) | +12.00 | 8.5 |"
    # heldout_loss in nats, minus the loss: signal +1, sd 0.1414: 7.1
    assert rows["heldout_loss"].endswith("| +1.0000 | 7.1 |")
    assert rows["zeroshot_coarse"].endswith("| +0.00 | — (no spread) |")


def _features(image: torch.Tensor, text: torch.Tensor):
    from jestclip.eval.evaluate import SuiteFeatures

    n = image.shape[0]
    return SuiteFeatures(
        image=image, text=text, labels={}, concepts=torch.arange(n), keys=[str(i) for i in range(n)]
    )


def test_steering_probe_reads_each_similarity_from_the_right_features():
    probe = steering_probe.probe
    n, d = 200, 256
    g = torch.Generator().manual_seed(0)
    unit = lambda x: torch.nn.functional.normalize(x, dim=1)  # noqa: E731
    right = unit(torch.randn(n, d, generator=g))
    close = unit(right + 0.005 * torch.randn(n, d, generator=g))  # the reference: every pair matches closely
    noise = unit(torch.randn(n, d, generator=g))
    reference = _features(right, close)
    # a learner that knows nothing: its captions are unrelated to its images
    blind = probe([_features(unit(torch.randn(n, d, generator=g)), noise)], [reference])
    assert blind["r5_reference"] == 100.0  # each image's own caption is its most similar (cosine 1)
    assert blind["r5_learner"] < 20.0  # about 5 at chance within galleries of 100
    assert blind["r5_sum"] == 100.0  # the reference's exact match dominates the ensemble
    assert blind["r5_steered"] < 5.0  # minus the reference: its own caption ranks last
    assert blind["cos_pos_reference"] == pytest.approx(1.0, abs=0.01)
    assert abs(blind["cos_neg_reference"]) < 0.01
    assert abs(blind["corr_pos"]) < 0.3 and abs(blind["corr_neg"]) < 0.1
    # a learner equal to the reference: learner and sum rank as the reference does, the residual is all zero
    same = probe([_features(right, close.clone())], [reference])
    assert same["r5_learner"] == same["r5_sum"] == 100.0
    assert same["cos_pos_learner"] == pytest.approx(same["cos_pos_reference"])
    assert same["corr_pos"] == pytest.approx(1.0) and same["corr_neg"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="learner rows"):
        probe([_features(right[:10], right[:10])], [reference])


def test_steering_probe_table_groups_seeds_into_one_row():
    script = steering_probe
    row = {key: 1.0 for key, _, _ in script.TABLE} | {"r5_reference": 17.0}
    row |= {"cos_pos_reference": 0.5, "cos_neg_reference": 0.4}
    rows = [
        row | {"run": "runs/x/drrho-a-s0", "r5_learner": 10.0},
        row | {"run": "runs/x/drrho-a-s1", "r5_learner": 12.0},
    ]
    rows.append(row | {"run": "runs/x/iid-a-s0"})
    lines = script.table(rows)
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["drrho-a", "iid-a", "reference"]
    assert lines[2].startswith("| drrho-a | 2 | 11.00 ± 1.41 | 1.00 ± 0.00 |")
    assert lines[3].startswith("| iid-a | 1 | 1.00 | 1.00 |")
    assert lines[4] == "| reference | — | 17.00 | — | — | 0.500 | 0.400 | — | — |"
