"""The same contract for every registered method (built-ins and installed plugins), run by
the kit third-party authors use (:mod:`sslcli.testing`): one implementation of the checks.

One CPU training step; every trainable parameter receives a gradient and buffers change
as declared; state survives checkpoint -> resume exactly; the exported encoder loads in
plain timm and equals ``embed``; recipe and defaults validate; (slow) two gloo processes
equal one. Here besides, on the method as the trainer builds it: its views are valid
ViewSpecs at the run's image size, ``embed`` gives one row of the method's width per image
whatever the batch, and all its state is in ``state_dict``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from sslcli.backbones import feature_dim
from sslcli.data.views import ViewSpec, expand
from sslcli.testing import ContractCase, MethodContract, make_trainer
from tests.helpers import METHODS, contract_case

# CMC's representation is the concatenation of its two view encoders' features (L and ab).
EMBED_ENCODERS: dict[str, int] = {"cmc": 2}


class TestRegisteredMethods(MethodContract):
    @pytest.fixture(params=METHODS)
    def contract_case(self, request: pytest.FixtureRequest) -> ContractCase:
        return contract_case(request.param)


@pytest.fixture(scope="module", params=METHODS)
def built(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """The trainer of a registered method (its contract case, first backbone)."""
    tr = make_trainer(contract_case(request.param), tmp_path_factory.mktemp(request.param))
    yield tr
    tr.close()


def test_views_are_valid_viewspecs_at_the_runs_image_size(built: Any) -> None:
    name, size = built.run.method, built.run.data.image_size
    specs = built.method.views()
    assert isinstance(specs, list) and specs, f"{name}: views() is {specs!r}"
    for s in specs:
        assert isinstance(s, ViewSpec), f"{name}: {s!r} is not a ViewSpec"
        # Re-validation runs the field and range checks a hand-made copy would skip.
        assert ViewSpec.model_validate(s.model_dump()) == s, f"{name}: {s!r}"
    views = expand(specs)
    assert len(views) == sum(s.count for s in specs)
    sizes = [v.size for v in views]
    assert all(1 <= v <= size for v in sizes), f"{name}: view sizes {sizes} for {size} px"
    assert max(sizes) == size, f"{name}: no view at the run's image size {size}: {sizes}"


def test_embed_gives_one_row_of_the_methods_width_per_image(built: Any) -> None:
    name, size = built.run.method, built.run.data.image_size
    m = built.method
    m.eval()
    x = torch.rand(5, 3, size, size, generator=torch.Generator().manual_seed(0))
    width = EMBED_ENCODERS.get(name, 1) * feature_dim(m.encoder())
    with torch.no_grad():
        e = m.embed(x)
        first = m.embed(x[:1])
    assert e.shape == (5, width) and e.dtype == torch.float32, f"{name}: {tuple(e.shape)}"
    assert bool(torch.isfinite(e).all()), name
    # Evaluation features are per image: the rest of the batch does not change a row.
    torch.testing.assert_close(first, e[:1], rtol=1e-4, atol=1e-5, msg=name)


def test_all_state_is_in_state_dict(built: Any) -> None:
    name, m = built.run.method, built.method
    case = contract_case(name)
    keys = set(m.state_dict())
    params = [n for n, _ in m.named_parameters()]
    assert set(params) <= keys, f"{name}: parameters outside state_dict"
    # A buffer left out of the checkpoint must be a constant the method rebuilds (declared
    # static in its contract case: CPC's causal masks).
    left_out = [
        n for n, _ in m.named_buffers()
        if n not in keys and not any(fnmatch.fnmatch(n, p) for p in case.static_buffers)
    ]  # fmt: skip
    assert not left_out, f"{name}: buffers not saved: {left_out[:5]}"
    # A tensor kept as a plain attribute is neither saved, moved to the device nor synced.
    loose = [
        f"{mod_name}.{attr}"
        for mod_name, mod in m.named_modules()
        for attr, value in vars(mod).items()
        if isinstance(value, torch.Tensor)
    ]
    assert not loose, f"{name}: tensors outside the module's state: {loose[:5]}"

