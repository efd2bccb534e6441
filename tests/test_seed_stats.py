"""The seed statistics of the summary (`mvptr.seed_stats`): mean +- std over seeds and the paired bootstrap
interval of each ablation's difference from its method's full model.

Why: the study's claims rest on these intervals. The bootstrap must give the exact difference when there is no
noise, cover a null difference about 95% of the time, find a real one, and the table must mark exactly the
intervals that exclude 0.

Run: .venv/bin/python -m pytest tests/test_seed_stats.py      (a few seconds)
"""

from __future__ import annotations

import numpy as np
import pytest

from mvptr.seed_stats import paired_bootstrap, seed_statistics, statistics_markdown


def test_a_constant_difference_is_its_own_interval() -> None:
    reference = np.random.default_rng(0).integers(0, 2, size=(3, 50)).astype(float) * 100
    diff, low, high = paired_bootstrap(reference + 7.0, reference)
    assert diff == pytest.approx(7.0, abs=1e-12) and low == pytest.approx(7.0, abs=1e-9)
    assert high == pytest.approx(7.0, abs=1e-9)


def simulated(rng: np.random.Generator, effect: float, seeds: int = 3, items: int = 200) -> tuple[float, float]:
    """An accuracy-like study: per-item difficulty shared by both rows, 0/100 outcomes, `effect` points apart."""
    difficulty = rng.uniform(0.2, 0.8, size=items)
    full = (rng.random((seeds, items)) < difficulty).astype(float) * 100
    ablation = (rng.random((seeds, items)) < np.clip(difficulty + effect / 100, 0, 1)).astype(float) * 100
    _, low, high = paired_bootstrap(ablation, full, resamples=1000, seed=int(rng.integers(1 << 30)))
    return low, high


def test_a_null_difference_is_excluded_about_five_percent_of_the_time() -> None:
    rng = np.random.default_rng(1)
    excluded = sum(low > 0 or high < 0 for low, high in (simulated(rng, 0.0) for _ in range(300)))
    # 95% intervals: 15 of 300 expected, binomial sd 3.8; percentile bootstrap runs a little narrow.
    assert 3 <= excluded <= 30, excluded


def test_a_ten_point_difference_is_found() -> None:
    rng = np.random.default_rng(2)
    found = sum(low > 0 for low, _ in (simulated(rng, 10.0) for _ in range(50)))
    assert found >= 45, found


def evaluation(task: str, accuracy_items: list[float]) -> dict:
    split = {"accuracy": sum(accuracy_items) / len(accuracy_items), "item_scores": {"accuracy": accuracy_items}}
    return {"task": task, "splits": {"test": split}, "seconds": 1.0}


def test_statistics_mean_std_and_marks() -> None:
    good = [100.0] * 40 + [0.0] * 10  # 80
    found = {}
    for seed, shift in ((0, 0), (1, 2), (2, 4)):
        found[("m", "full", seed, "ve")] = evaluation("ve", good[shift:] + good[:shift])
        found[("m", "worse", seed, "ve")] = evaluation("ve", [0.0] * 30 + [100.0] * 20)  # 40
        found[("m", "same", seed, "ve")] = evaluation("ve", good[::-1])  # 80, other items right
    stats = seed_statistics(found, ["m"])
    rows = stats["rows"]
    assert list(rows) == ["m/full", "m/same", "m/worse"]
    assert rows["m/full"]["VE"]["mean"] == pytest.approx(80.0) and rows["m/full"]["VE"]["std"] == 0.0
    assert "diff" not in rows["m/full"]["VE"]
    worse = rows["m/worse"]["VE"]
    assert worse["diff"] == pytest.approx(-40.0) and worse["high"] < 0 and worse["excludes_zero"]
    same = rows["m/same"]["VE"]
    assert same["diff"] == pytest.approx(0.0) and same["low"] < 0 < same["high"] and not same["excludes_zero"]
    text = statistics_markdown(stats)
    assert "| m/worse | 3 | -40.0 [" in text and text.count("]*") == 1
    assert "| m/full | 3 | 80.0 ± 0.0 |" in text


def test_one_seed_has_no_std_but_an_item_interval() -> None:
    found = {("m", "full", 0, "ve"): evaluation("ve", [100.0] * 30 + [0.0] * 20),
             ("m", "abl", 0, "ve"): evaluation("ve", [100.0] * 10 + [0.0] * 40)}
    row = seed_statistics(found)["rows"]["m/abl"]["VE"]
    assert row["std"] is None and row["n"] == 1 and row["paired_seeds"] == 1
    assert row["diff"] == pytest.approx(-40.0) and row["excludes_zero"]
