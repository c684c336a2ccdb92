"""POST /prism/replay's handler refuses what it cannot replay with a 400, never a 500 or a wrong top-k."""

from types import SimpleNamespace

import pytest
import torch

from prism_moe.model.replay import ReplayRouting
from prism_moe.runtime.server import ControlError, EdgeServer

WORKLOAD = "embedded:esft:law"  # 26 MoE layers x 64 experts, top-6


def _server(top_k: int) -> SimpleNamespace:
    routing = ReplayRouting(torch.zeros(4, 26, top_k, dtype=torch.long))
    return SimpleNamespace(name="s0", options=SimpleNamespace(replay="embedded:esft:intent", data_dir=None),
                           placement=SimpleNamespace(num_layers=26, num_experts=64),
                           _replay=SimpleNamespace(routing=routing))


def test_switches_to_a_trace_of_the_models_shape() -> None:
    s = _server(top_k=6)
    assert EdgeServer.set_replay(s, WORKLOAD) == {"server": "s0", "replay": WORKLOAD}
    assert s._replay.routing.experts.shape[1:] == (26, 6)


@pytest.mark.parametrize("workload", ["esft:no-such-domain", "nosuchfamily:x", "/no/such/trace.safetensors"])
def test_unknown_workload_is_a_400(workload: str) -> None:
    with pytest.raises(ControlError) as err:
        EdgeServer.set_replay(_server(top_k=6), workload)
    assert err.value.status == 400 and workload in err.value.message


def test_other_top_k_is_refused() -> None:
    s = _server(top_k=2)
    before = s._replay.routing
    with pytest.raises(ControlError) as err:
        EdgeServer.set_replay(s, WORKLOAD)
    assert err.value.status == 400 and "top-2" in err.value.message
    assert s._replay.routing is before


def test_placement_body_needs_a_finite_drain_timeout() -> None:
    """JSON's Infinity would pass `ge=0`, switch the placement, then overflow the drain wait (a 500)."""
    from pydantic import ValidationError

    from prism_moe.runtime.server import PlacementBody

    assert PlacementBody.model_validate({"placement": {}, "drain_timeout": 3}).drain_timeout == 3.0
    for bad in (float("inf"), float("nan"), -1):
        with pytest.raises(ValidationError, match="drain_timeout"):
            PlacementBody.model_validate({"placement": {}, "drain_timeout": bad})
