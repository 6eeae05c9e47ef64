"""A short real training run learns: SimCLR on the embedded digits, judged by kNN top-1
on the test split against the same architecture at random initialisation.

Small enough for CI on two CPU cores (timm's ``test_resnet``, 16 px); the per-method runs
on ``resnet18`` are marked slow in each method's test file.
"""

from __future__ import annotations

from pathlib import Path

from sslcli import api


def test_simclr_on_digits_beats_random_init(tmp_path: Path) -> None:
    result = api.train(
        "simclr",
        overrides={
            "backbone": {"name": "test_resnet"},
            "data": {"dataset": "digits", "image_size": 16},
            # A larger lr than the recipe's 0.3 x B/256: ~110 LARS steps must move the
            # weights far enough from their initialisation.
            "optim": {"lr": 1.0},
            "trainer": {"epochs": 10, "batch_size": 128, "out": str(tmp_path / "run")},
        },
    )
    assert result.knn_random is not None and result.knn_trained is not None
    # A margin, not just ">": an untrained or collapsed encoder cannot pass by noise.
    assert result.knn_trained > result.knn_random + 0.03, (result.knn_trained, result.knn_random)
