"""Recipe files carry what the official code does beyond the hyper-parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from sslcli import api

RECIPES = Path(__file__).resolve().parent.parent / "examples" / "recipes"

# Official codes that synchronise BatchNorm statistics over all processes: MoCo v3 and
# SimSiam (convert_sync_batchnorm in main_moco.py / main_simsiam.py), BYOL and SimCLR
# (cross-replica / global BN on TPU), SwAV (SyncBN; apex groups of 8 GPUs for the large
# batches), DINO on a ResNet (SyncBN whenever the network has BatchNorm). MoCo v1/v2 use
# shuffle-BN instead (per-GPU statistics on a shuffled key batch), on purpose.
SYNC_BN = {
    "byol-imagenet.toml",
    "dino-resnet50-imagenet.toml",
    "moco-v3-resnet50-imagenet.toml",
    "moco-v3-vit-s-imagenet.toml",
    "simclr-imagenet.toml",
    "simclr-v2-imagenet.toml",
    "simsiam-imagenet.toml",
    "swav-imagenet-bs256.toml",
    "swav-imagenet.toml",
}
PER_PROCESS_BN = {"moco-v1-imagenet.toml", "moco-v2-imagenet.toml"}


@pytest.mark.parametrize("recipe", sorted(SYNC_BN | PER_PROCESS_BN))
def test_imagenet_recipes_synchronise_bn_where_the_official_code_does(recipe: str) -> None:
    _, run, _ = api.resolve_config(config=RECIPES / recipe)
    assert run.trainer.sync_bn is (recipe in SYNC_BN)
