"""A short real training run learns: for each method, kNN top-1 on the test split of the
trained encoder against the same architecture at random initialisation.

One row per method: the data, the settings that make it learn in a short CPU run, and the
margin it must clear. SimCLR on ``test_resnet`` runs in CI (two CPU cores); the rows on
``resnet18`` are minutes each and marked slow.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sslcli import api, registry
from tests.helpers import write_coloured_digits

RECIPES = Path(__file__).resolve().parent.parent / "examples" / "recipes"
# The small-image preset with a short warm-up (its optimiser is sized for short runs at
# small batches; the ImageNet LARS rates x B/256 would barely move the weights in a few
# hundred steps).
CIFAR_PRESET_ON_DIGITS: dict[str, Any] = {
    "data": {"dataset": "digits", "image_size": 16},
    "backbone": {"name": "resnet18"},
    "schedule": {"warmup_epochs": 0.5},
    "trainer": {"epochs": 5, "batch_size": 64, "log_every": 10},
}


@dataclass(frozen=True)
class Row:
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    """Merged over the method's defaults (or ``recipe``); ``trainer.out`` is added."""
    recipe: str | None = None
    """A file in examples/recipes/ the overrides go over."""
    margin: float = 0.0
    """kNN trained must exceed kNN at random init by more than this."""
    data: Callable[[Path], Path] | None = None
    """Writes the data set under the given directory; ``data.dataset`` is then
    ``imagefolder:`` that directory."""


ROWS: list[Any] = [
    # A larger lr than the recipe's 0.3 x B/256: ~110 LARS steps must move the weights far
    # enough from their initialisation. A margin, not just ">": an untrained or collapsed
    # encoder cannot pass by noise.
    pytest.param(Row("simclr", {
        "backbone": {"name": "test_resnet"},
        "data": {"dataset": "digits", "image_size": 16},
        "optim": {"lr": 1.0},
        "trainer": {"epochs": 10, "batch_size": 128},
    }, margin=0.03), id="simclr"),
    pytest.param(Row("simclr-v2", {
        "backbone": {"name": "resnet18"},
        "trainer": {"epochs": 15, "batch_size": 128, "log_every": 11},
        # the official 10 warm-up epochs would be most of this short run
        "schedule": {"warmup_epochs": 1},
    }), id="simclr-v2", marks=pytest.mark.slow),
    *[pytest.param(Row(name, {
        "backbone": {"name": "resnet18"},
        "trainer": {"epochs": 15, "batch_size": 128, "log_every": 11},
        # digits has 1,437 images: a 65,536-key queue would hold random keys for the
        # whole run, so the run uses a short queue and a faster-moving key encoder.
        "method": {"queue_size": 1024, "momentum": 0.99},
    }), id=name, marks=pytest.mark.slow) for name in ("moco-v1", "moco-v2")],
    pytest.param(Row("moco-v3", CIFAR_PRESET_ON_DIGITS, recipe="moco-v3-cifar.toml"),
                 id="moco-v3", marks=pytest.mark.slow),
    pytest.param(Row("byol", CIFAR_PRESET_ON_DIGITS, recipe="byol-cifar.toml"),
                 id="byol", marks=pytest.mark.slow),
    # The paper's CIFAR setup (2-layer projector, no blur, wd 5e-4) with a larger learning
    # rate: at 0.03 x 64/256 the predictor needs far more than 110 steps to align p with
    # z (the loss stays near 0); 0.5 x B/256 is solo-learn's CIFAR rate.
    pytest.param(Row("simsiam", {
        "data": {"dataset": "digits", "image_size": 16},
        "backbone": {"name": "resnet18"},
        "optim": {"lr": 0.5},
        "trainer": {"epochs": 5, "batch_size": 64, "log_every": 10},
    }, recipe="simsiam-cifar.toml"), id="simsiam", marks=pytest.mark.slow),
    pytest.param(Row("dino", {
        # The official convnet runs have no stochastic depth (the recipe's 0.1 is ViTs').
        "backbone": {"name": "resnet18", "drop_path_rate": 0.0},
        "trainer": {"epochs": 8, "batch_size": 64, "log_every": 22},
        # 176 steps on 1,437 images: a 1024-wide output is plenty for 10 classes, a 0.996
        # teacher would hardly move from its random init in so few steps, and 4 local
        # crops instead of 8 keep the run within a CPU budget.
        "method": {"out_dim": 1024, "momentum_teacher": 0.99, "local_crops_number": 4},
    }), id="dino", marks=pytest.mark.slow),
    pytest.param(Row("swav", {
        "backbone": {"name": "resnet18"},
        "trainer": {"epochs": 8, "batch_size": 64, "log_every": 22},
        # digits: 10 classes and 1,437 training images (22 steps per epoch), so ~10x the
        # classes as prototypes and the prototypes frozen for one epoch, as on ImageNet;
        # 4 local crops instead of 6 keep the run within a CPU budget.
        "method": {
            "num_prototypes": 100,
            "freeze_prototypes_iters": 22,
            "local_crops_number": 4,
        },
    }), id="swav", marks=pytest.mark.slow),
    # Bare `ssl train instdisc`: digits, 16 px, batch 128, small-stem ResNet-18, 4 epochs,
    # the exact softmax over the bank (the default below 32,768 images). Measured: 75.8 %
    # kNN against 57.1 % at random init; NCE (K 179 or 4096, frozen Z) collapsed instead.
    pytest.param(Row("instdisc"), id="instdisc", marks=pytest.mark.slow),
    pytest.param(Row("invaspread", {
        "backbone": {"name": "resnet18"},
        "data": {"image_size": 16},
        "trainer": {"epochs": 10, "batch_size": 128, "log_every": 11},
    }), id="invaspread", marks=pytest.mark.slow),
    # `ssl train cmc` defaults (NCE with frozen Z, τ 0.07, SGD lr 0.03) at the digits scale
    # (16-px images, batch 128, small-stem ResNet-18), except K: with 1,438 images, K 4096
    # would draw each anchor's own row ~3 times among its noise (see InstDisc's row). The
    # embedded digits are grey, so CMC's chroma view would carry nothing: coloured digits.
    pytest.param(Row("cmc", {
        "backbone": {"name": "resnet18"},
        "data": {"image_size": 16},
        "trainer": {"epochs": 10, "batch_size": 128, "log_every": 11},
        "method": {"nce_k": 256},
    }, data=write_coloured_digits), id="cmc", marks=pytest.mark.slow),
    # Bare `ssl train cpc`: v2 settings (layer norm, four directions, K 5, patch colour
    # dropping and flips; Adam 2e-4) on 16-px digits with ResNet-18, 4 epochs at the
    # recipe's CPU batch of 8 (measured: kNN 58.2 % vs 46.0 %, about 7 minutes).
    pytest.param(Row("cpc", {"trainer": {"log_every": 50}}, margin=0.05),
                 id="cpc", marks=pytest.mark.slow),
]  # fmt: skip


@pytest.mark.parametrize("row", ROWS)
def test_short_run_beats_random_init(row: Row, tmp_path: Path) -> None:
    overrides = copy.deepcopy(row.overrides)
    if row.data is not None:
        data = row.data(tmp_path / "data")
        overrides["data"] = {**overrides.get("data", {}), "dataset": f"imagefolder:{data}"}
    overrides["trainer"] = {**overrides.get("trainer", {}), "out": str(tmp_path / "run")}
    result = api.train(
        row.method,
        config=RECIPES / row.recipe if row.recipe else None,
        overrides=overrides,
    )
    print(f"{row.method} kNN trained {result.knn_trained} random {result.knn_random}")
    assert result.knn_trained is not None and result.knn_random is not None
    assert result.knn_trained > result.knn_random + row.margin, (
        result.knn_trained, result.knn_random,
    )  # fmt: skip


def test_every_built_in_method_has_a_row() -> None:
    built_in = sorted(n for n, info in registry.find().items() if info.builtin)
    assert sorted(p.values[0].method for p in ROWS) == built_in
