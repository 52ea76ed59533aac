"""The node service's wire format: generated code is current, tensors are checked, messages round-trip."""

import dataclasses

import numpy as np
import pytest

from exo_core.models.shard import Shard
from exo_core.networking import proto_gen, wire
from exo_core.networking.generated import node_service_pb2 as pb
from exo_core.node.messages import StageFailure, StepMessage, TokenMessage
from exo_core.node.partitioning import PlanStage
from exo_core.node.sampling import SamplingParams
from exo_core.node.topology import DeviceCapabilities, NodeInfo


def test_generated_code_is_current(tmp_path):
    """`make proto` output must match what is committed (stale generated code fails here)."""
    proto_gen.generate(tmp_path)
    for name in (*proto_gen.FILES, "__init__.py"):
        fresh = proto_gen.normalized((tmp_path / name).read_text(encoding="utf-8"))
        committed = proto_gen.normalized((proto_gen.GENERATED / name).read_text(encoding="utf-8"))
        assert fresh == committed, f"{name} is stale: run `make proto` and commit the result"


def test_grpc_module_imports_relatively():
    text = (proto_gen.GENERATED / "node_service_pb2_grpc.py").read_text(encoding="utf-8")
    assert "from . import node_service_pb2" in text


def _plan():
    return (
        PlanStage("a", Shard("m", 0, 14, 30)),
        PlanStage("b", Shard("m", 15, 29, 30)),
    )


def _step(**kw):
    base = dict(
        request_id="r1",
        attempt=2,
        origin="a",
        plan=_plan(),
        stage_index=1,
        sampling=SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=11, top_logprobs=3),
        max_tokens=64,
        eos_token_ids=(2, 7),
        step=5,
        start_pos=40,
        hidden=np.arange(3 * 8, dtype=np.float32).reshape(3, 8) / 7,
        replayed=(4, 5),
    )
    base.update(kw)
    return StepMessage(**base)


def test_step_round_trip_keeps_float32_hidden_exactly():
    msg = _step()
    back = wire.step_from_pb(pb.StepRequest.FromString(wire.step_to_pb(msg).SerializeToString()))
    assert back.hidden.dtype == np.float32 and back.hidden.shape == (3, 8)
    np.testing.assert_array_equal(back.hidden, msg.hidden)
    for name in ("request_id", "attempt", "origin", "plan", "stage_index", "sampling", "max_tokens"):
        assert getattr(back, name) == getattr(msg, name)
    assert (back.eos_token_ids, back.step, back.start_pos, back.replayed) == ((2, 7), 5, 40, (4, 5))
    assert back.tokens is None and back.messages is None


def test_step_with_tokens_and_messages():
    msg = _step(
        stage_index=0,
        hidden=None,
        tokens=np.array([1, 2, 3], dtype=np.int64),
        messages=[{"role": "user", "content": "héllo"}],
    )
    back = wire.step_from_pb(wire.step_to_pb(msg))
    assert back.tokens.tolist() == [1, 2, 3] and back.tokens.dtype == np.int64
    assert back.messages == [{"role": "user", "content": "héllo"}]
    assert (
        back.sampling.seed == 11
        and wire.step_from_pb(wire.step_to_pb(_step(sampling=SamplingParams()))).sampling.seed is None
    )


def test_hidden_states_always_travel_as_float32():
    msg = _step(hidden=np.ones((2, 4), dtype=np.float16))
    assert wire.step_to_pb(msg).hidden.dtype == "float32"


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda m: setattr(m.hidden, "data", m.hidden.data[:-1]), "bytes for shape"),
        (lambda m: m.hidden.shape.append(2), "rank"),
        (lambda m: setattr(m.hidden, "dtype", "float64"), "dtype"),
        (lambda m: m.hidden.shape.__setitem__(0, -3), "negative"),
        (lambda m: setattr(m, "stage_index", 2), "outside a plan"),
        (lambda m: m.ClearField("plan"), "without a plan"),
        (lambda m: m.ClearField("hidden"), "either tokens or hidden"),
        (
            lambda m: m.tokens.CopyFrom(pb.Tensor(data=b"\0" * 8, dtype="int64", shape=[1])),
            "either tokens or hidden",
        ),
        (lambda m: setattr(m, "messages_json", "{not json"), "messages_json"),
        (lambda m: setattr(m.plan[0].shard, "end_layer", 40), "invalid shard"),
    ],
)
def test_malformed_steps_are_refused(mutate, match):
    msg = wire.step_to_pb(_step())
    mutate(msg)
    with pytest.raises(wire.WireError, match=match):
        wire.step_from_pb(msg)


def test_oversized_shape_is_refused_before_allocating():
    msg = wire.step_to_pb(_step())
    msg.hidden.shape[:] = [1 << 20, 1 << 20]
    with pytest.raises(wire.WireError, match="too large"):
        wire.step_from_pb(msg)


def test_token_failure_and_node_info_round_trip():
    tok = TokenMessage("r", 1, 3, 42, -0.5, ((42, -0.5), (7, -1.25)), "length")
    assert wire.token_from_pb(wire.token_to_pb(tok)) == tok
    err = TokenMessage("r", 1, 3, error="boom")
    assert wire.token_from_pb(wire.token_to_pb(err)) == err
    fail = StageFailure("r", 1, "b", "gone")
    assert wire.failure_from_pb(wire.failure_to_pb(fail)) == fail
    info = NodeInfo(
        "n1",
        "10.0.0.2",
        5000,
        DeviceCapabilities("Mac", "M2", 16384, {"fp32": 3.5, "fp16": 7.0, "int8": 14.0}),
        "tinygrad",
        True,
        ("smollm2-135m",),
        3,
    )
    assert wire.node_info_from_pb(wire.node_info_to_pb(info)) == info
    fronting = dataclasses.replace(info, servers=(("smollm2-135m", 2),))
    assert wire.node_info_from_pb(wire.node_info_to_pb(fronting)).servers == fronting.servers
