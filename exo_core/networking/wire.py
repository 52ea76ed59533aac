"""Conversions between the node's messages and the protobuf messages of node_service.proto.

Tensors cross as raw bytes + dtype + shape; a message whose byte count disagrees with its
shape, or whose dtype or rank is not what the field holds, is refused with `WireError`.
Hidden states always travel as float32.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from exo_core.engine import TextDelta, TextGeneration, ToolCall
from exo_core.models.cards import ModelCard
from exo_core.models.shard import Shard
from exo_core.networking.generated import node_service_pb2 as pb
from exo_core.node.messages import StageFailure, StepMessage, TokenMessage
from exo_core.node.partitioning import PlanStage
from exo_core.node.sampling import SamplingParams
from exo_core.node.topology import DeviceCapabilities, NodeInfo

# What each tensor field may hold: dtype and rank.
TOKENS_DTYPE, TOKENS_RANK = np.dtype(np.int64), 1
HIDDEN_DTYPE, HIDDEN_RANK = np.dtype(np.float32), 2
MAX_TENSOR_BYTES = 1 << 30
_LITTLE_ENDIAN = np.little_endian
# Every step of a request carries its plan and sampling: each is encoded and decoded once.
_PLANS: dict[tuple[Any, ...], tuple[PlanStage, ...]] = {}
_PLANS_PB: dict[tuple[PlanStage, ...], list[pb.PlanStage]] = {}
_SAMPLINGS: dict[bytes, SamplingParams] = {}
_MAX_PLANS = 1024
_LE = {dt: dt.newbyteorder("<") for dt in (np.dtype(np.int64), np.dtype(np.float32))}
_NAMES = {dt: dt.name for dt in _LE}  # (numpy computes `dtype.name` in Python, each time)


class WireError(ValueError):
    """A message from a peer is malformed; the RPC is refused with INVALID_ARGUMENT."""


# ---- tensors ---------------------------------------------------------------------------------


def tensor_to_pb(array: np.ndarray, dtype: np.dtype) -> pb.Tensor:
    if not (array.dtype == dtype and array.flags.c_contiguous and _LITTLE_ENDIAN):
        array = np.ascontiguousarray(array, dtype=dtype).astype(dtype.newbyteorder("<"), copy=False)
    return pb.Tensor(data=array.tobytes(), dtype=_NAMES.get(dtype) or dtype.name, shape=array.shape)


def tensor_from_pb(msg: pb.Tensor, dtype: np.dtype, rank: int, field: str) -> np.ndarray:
    if msg.dtype != (_NAMES.get(dtype) or dtype.name):
        raise WireError(f"{field}: dtype {msg.dtype!r}, expected {dtype.name}")
    shape = tuple(int(d) for d in msg.shape)
    if len(shape) != rank:
        raise WireError(f"{field}: shape {list(shape)} has rank {len(shape)}, expected {rank}")
    if any(d < 0 for d in shape):
        raise WireError(f"{field}: negative dimension in shape {list(shape)}")
    expected = math.prod(shape) * dtype.itemsize
    if expected > MAX_TENSOR_BYTES:
        raise WireError(f"{field}: shape {list(shape)} is too large")
    if len(msg.data) != expected:
        raise WireError(
            f"{field}: {len(msg.data)} bytes for shape {list(shape)} {dtype.name} (expected {expected})"
        )
    # A writable, native-order copy: engines may work in place.
    little = _LE.get(dtype) or dtype.newbyteorder("<")
    array = np.frombuffer(msg.data, dtype=little).reshape(shape)
    return array.copy() if _LITTLE_ENDIAN else array.astype(dtype)


# ---- plans and sampling ------------------------------------------------------------------------


def shard_to_pb(shard: Shard) -> pb.Shard:
    return pb.Shard(
        model_id=shard.model_id,
        start_layer=shard.start_layer,
        end_layer=shard.end_layer,
        n_layers=shard.n_layers,
    )


def shard_from_pb(msg: pb.Shard) -> Shard:
    try:
        return Shard(msg.model_id, msg.start_layer, msg.end_layer, msg.n_layers)
    except ValueError as exc:
        raise WireError(str(exc)) from None


def plan_from_pb(stages: Any) -> tuple[PlanStage, ...]:
    """The plan of a step; the same plan arrives with every step of a request, so it is built once."""
    key = tuple(
        (s.node_id, s.shard.model_id, s.shard.start_layer, s.shard.end_layer, s.shard.n_layers)
        for s in stages
    )
    plan = _PLANS.get(key)
    if plan is None:
        plan = tuple(PlanStage(s.node_id, shard_from_pb(s.shard)) for s in stages)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def sampling_to_pb(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.top_logprobs is not None:
        msg.top_logprobs = params.top_logprobs
    return msg


def _cached_sampling(msg: pb.SamplingParams) -> SamplingParams:
    key = msg.SerializeToString(deterministic=True)
    params = _SAMPLINGS.get(key)
    if params is None:
        if len(_SAMPLINGS) >= _MAX_PLANS:
            _SAMPLINGS.clear()
        params = _SAMPLINGS[key] = sampling_from_pb(msg)
    return params


def _plan_to_pb(plan: tuple[PlanStage, ...]) -> list[pb.PlanStage]:
    stages = _PLANS_PB.get(plan)
    if stages is None:
        if len(_PLANS_PB) >= _MAX_PLANS:
            _PLANS_PB.clear()
        stages = _PLANS_PB[plan] = [pb.PlanStage(node_id=s.node_id, shard=shard_to_pb(s.shard)) for s in plan]
    return stages


def sampling_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=msg.temperature,
        top_p=msg.top_p,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        top_logprobs=msg.top_logprobs if msg.HasField("top_logprobs") else None,
    )


# ---- steps, tokens, failures -----------------------------------------------------------------


def step_to_pb(step: StepMessage) -> pb.StepRequest:
    msg = pb.StepRequest(
        request_id=step.request_id,
        attempt=step.attempt,
        origin=step.origin,
        plan=_plan_to_pb(step.plan),
        stage_index=step.stage_index,
        sampling=sampling_to_pb(step.sampling),
        max_tokens=step.max_tokens,
        eos_token_ids=step.eos_token_ids,
        step=step.step,
        start_pos=step.start_pos,
        replayed=step.replayed,
        reuse_from=step.reuse_from,
        more=step.more,
    )
    if step.constraint is not None:
        msg.constraint = step.constraint
    if step.tokens is not None:
        msg.tokens.CopyFrom(tensor_to_pb(step.tokens, TOKENS_DTYPE))
    if step.hidden is not None:
        msg.hidden.CopyFrom(tensor_to_pb(step.hidden, HIDDEN_DTYPE))
    if step.messages is not None:
        msg.messages_json = json.dumps(step.messages, ensure_ascii=False)
    if step.deliver is not None:
        msg.deliver.CopyFrom(token_to_pb(step.deliver))
    if step.card is not None:
        msg.card_json = json.dumps(step.card.to_dict(), ensure_ascii=False)
    return msg


def _messages_from_json(text: str) -> list[dict[str, Any]] | None:
    """The chat messages a message carries in `messages_json` (None when it carries none)."""
    if not text:
        return None
    try:
        messages = json.loads(text)
    except ValueError as exc:
        raise WireError(f"messages_json: {exc}") from None
    if not isinstance(messages, list):
        raise WireError("messages_json must hold a list of messages")
    return messages


def step_from_pb(msg: pb.StepRequest) -> StepMessage:
    """A step from a peer, checked: a plan, a stage in it, exactly one well-formed input."""
    if not msg.request_id:
        raise WireError("step without a request id")
    plan = plan_from_pb(msg.plan)
    if not plan:
        raise WireError("step without a plan")
    if not 0 <= msg.stage_index < len(plan):
        raise WireError(f"stage index {msg.stage_index} outside a plan of {len(plan)} stages")
    has_tokens, has_hidden = msg.HasField("tokens"), msg.HasField("hidden")
    if has_tokens == has_hidden:
        raise WireError("a step carries either tokens or hidden states")
    tokens = tensor_from_pb(msg.tokens, TOKENS_DTYPE, TOKENS_RANK, "tokens") if has_tokens else None
    hidden = tensor_from_pb(msg.hidden, HIDDEN_DTYPE, HIDDEN_RANK, "hidden") if has_hidden else None
    messages = _messages_from_json(msg.messages_json)
    if msg.step < 0 or msg.start_pos < 0 or msg.attempt < 0:
        raise WireError("negative step, position or attempt")
    return StepMessage(
        request_id=msg.request_id,
        attempt=msg.attempt,
        origin=msg.origin,
        plan=plan,
        stage_index=msg.stage_index,
        sampling=_cached_sampling(msg.sampling),
        max_tokens=msg.max_tokens,
        eos_token_ids=tuple(msg.eos_token_ids),
        step=msg.step,
        start_pos=msg.start_pos,
        tokens=tokens,
        hidden=hidden,
        messages=messages,
        replayed=tuple(msg.replayed),
        deliver=token_from_pb(msg.deliver) if msg.HasField("deliver") else None,
        constraint=msg.constraint if msg.HasField("constraint") else None,
        reuse_from=msg.reuse_from,
        more=msg.more,
        card=_card_from_json(msg.card_json),
    )


def _card_from_json(text: str) -> ModelCard | None:
    """The model card a first step carries in `card_json` (None when it carries none)."""
    if not text:
        return None
    try:
        return card_from_dict(json.loads(text))
    except (ValueError, WireError) as exc:
        raise WireError(f"card_json: {exc}") from None


def card_from_dict(data: Any) -> ModelCard:
    """A hub model's card as a peer sends it (`ModelCard.to_dict()`), checked; WireError if not one."""
    try:
        return ModelCard(
            id=str(data["id"]),
            name=str(data.get("name") or data["id"]),
            n_layers=int(data["n_layers"]),
            sources={str(k): str(v) for k, v in (data.get("sources") or {}).items()},
            tokenizer=str(data["tokenizer"]) if data.get("tokenizer") else None,
            context_length=int(data["context_length"]) if data.get("context_length") else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WireError(f"model card: {exc}") from None


def token_to_pb(token: TokenMessage) -> pb.TokenRequest:
    msg = pb.TokenRequest(
        request_id=token.request_id,
        attempt=token.attempt,
        step=token.step,
        token=token.token,
        top_logprobs=[pb.TokenTopLogprob(token=t, logprob=lp) for t, lp in token.top_logprobs],
        finish_reason=token.finish_reason or "",
        error=token.error or "",
        error_code=token.code or "",
    )
    if token.logprob is not None:
        msg.logprob = token.logprob
    return msg


def token_from_pb(msg: pb.TokenRequest) -> TokenMessage:
    if msg.finish_reason not in ("", "stop", "length"):
        raise WireError(f"unknown finish reason {msg.finish_reason!r}")
    return TokenMessage(
        request_id=msg.request_id,
        attempt=msg.attempt,
        step=msg.step,
        token=msg.token,
        logprob=msg.logprob if msg.HasField("logprob") else None,
        top_logprobs=tuple((t.token, t.logprob) for t in msg.top_logprobs),
        finish_reason=msg.finish_reason or None,
        error=msg.error or None,
        code=msg.error_code or None,
    )


def failure_to_pb(failure: StageFailure) -> pb.FailureRequest:
    return pb.FailureRequest(
        request_id=failure.request_id,
        attempt=failure.attempt,
        node_id=failure.node_id,
        reason=failure.reason,
        code=failure.code or "",
    )


def failure_from_pb(msg: pb.FailureRequest) -> StageFailure:
    return StageFailure(msg.request_id, msg.attempt, msg.node_id, msg.reason, msg.code or None)


# ---- node info -------------------------------------------------------------------------------


def capabilities_to_pb(caps: DeviceCapabilities) -> pb.DeviceCapabilities:
    flops = caps.flops
    return pb.DeviceCapabilities(
        model=caps.model,
        chip=caps.chip,
        memory=caps.memory,
        flops=pb.Flops(fp32=flops.get("fp32", 0.0), fp16=flops.get("fp16", 0.0), int8=flops.get("int8", 0.0)),
    )


def capabilities_from_pb(msg: pb.DeviceCapabilities) -> DeviceCapabilities:
    return DeviceCapabilities(
        model=msg.model or "Unknown",
        chip=msg.chip or "Unknown",
        memory=msg.memory,
        flops={"fp32": msg.flops.fp32, "fp16": msg.flops.fp16, "int8": msg.flops.int8},
    )


def node_info_to_pb(info: NodeInfo) -> pb.NodeInfo:
    return pb.NodeInfo(
        node_id=info.node_id,
        address=info.address,
        port=info.port,
        capabilities=capabilities_to_pb(info.capabilities),
        engine=info.engine,
        supports_sharding=info.supports_sharding,
        models=list(info.models),
        active_requests=info.active_requests,
        servers=dict(info.servers),
        hub_formats=list(info.hub_formats),
        link_port=info.link_port,
    )


def node_info_from_pb(msg: pb.NodeInfo) -> NodeInfo:
    return NodeInfo(
        node_id=msg.node_id,
        address=msg.address,
        port=msg.port,
        capabilities=capabilities_from_pb(msg.capabilities),
        engine=msg.engine,
        supports_sharding=msg.supports_sharding,
        models=tuple(msg.models),
        active_requests=msg.active_requests,
        servers=tuple(sorted((k, v) for k, v in msg.servers.items() if v > 0)),
        hub_formats=tuple(msg.hub_formats),
        link_port=msg.link_port,
    )


# ---- whole requests on text --------------------------------------------------------------------


def text_request_to_pb(request: TextGeneration, delivered: str = "") -> pb.TextGenerationRequest:
    msg = pb.TextGenerationRequest(
        request_id=request.request_id,
        model_id=request.model.id,
        sampling=sampling_to_pb(request.sampling),
        stop=list(request.stop),
        delivered=delivered,
    )
    if request.messages is not None:
        msg.messages_json = json.dumps(request.messages, ensure_ascii=False)
    if request.prompt is not None:
        msg.prompt = request.prompt
    if request.max_tokens is not None:
        msg.max_tokens = request.max_tokens
    if request.extra:
        msg.extra_json = json.dumps(request.extra, ensure_ascii=False)
    return msg


def text_request_from_pb(msg: pb.TextGenerationRequest, card: ModelCard) -> tuple[TextGeneration, str]:
    """The request (for `card`, the node's card of msg.model_id) and the text already delivered."""
    if not msg.request_id:
        raise WireError("text request without a request id")
    messages = _messages_from_json(msg.messages_json)
    prompt = msg.prompt if msg.HasField("prompt") else None
    if (messages is None) == (prompt is None):
        raise WireError("a text request carries either messages or a prompt")
    extra: dict[str, Any] = {}
    if msg.extra_json:
        try:
            extra = json.loads(msg.extra_json)
        except ValueError as exc:
            raise WireError(f"extra_json: {exc}") from None
        if not isinstance(extra, dict):
            raise WireError("extra_json must hold an object")
    request = TextGeneration(
        request_id=msg.request_id,
        model=card,
        messages=messages,
        prompt=prompt,
        sampling=sampling_from_pb(msg.sampling),
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        stop=tuple(msg.stop),
        extra=extra,
    )
    return request, msg.delivered


def delta_to_pb(delta: TextDelta) -> pb.TextDeltaReply:
    msg = pb.TextDeltaReply(text=delta.text, finish_reason=delta.finish_reason or "")
    if delta.prompt_tokens is not None:
        msg.prompt_tokens = delta.prompt_tokens
    if delta.completion_tokens is not None:
        msg.completion_tokens = delta.completion_tokens
    for call in delta.tool_calls:
        msg.tool_calls.add(id=call.id, name=call.name, arguments=call.arguments)
    return msg


def delta_from_pb(msg: pb.TextDeltaReply) -> TextDelta:
    if msg.finish_reason not in ("", "stop", "length", "tool_calls"):
        raise WireError(f"unknown finish reason {msg.finish_reason!r}")
    calls = tuple(ToolCall(c.id, c.name, c.arguments) for c in msg.tool_calls)
    if any(not c.name for c in calls):
        raise WireError("a tool call without a function name")
    return TextDelta(
        text=msg.text,
        finish_reason=msg.finish_reason or None,
        prompt_tokens=msg.prompt_tokens if msg.HasField("prompt_tokens") else None,
        completion_tokens=msg.completion_tokens if msg.HasField("completion_tokens") else None,
        tool_calls=calls,
    )
