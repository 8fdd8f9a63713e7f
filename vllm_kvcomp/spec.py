"""The compression spec: ``policy:budget[,key=value,...]``, ``none``, or a YAML preset.

One pydantic model, parsed once at start-up (and per request for overrides).
Every error is a ``KVCompSpecError`` whose one-line message names the bad part.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vllm_kvcomp.policies import POLICIES, Policy

# Where presets live when a bare name like ``long-chat`` is given.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class KVCompSpecError(ValueError):
    """A bad --kv-compression value. The message names the bad part."""


class Budget(BaseModel):
    """X < 1: fraction of the prompt's KV kept. X > 1: tokens kept. X == 1: keep all."""

    model_config = ConfigDict(frozen=True)
    value: float = Field(gt=0)

    @field_validator("value")
    @classmethod
    def _tokens_are_whole(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        if v > 1 and v != int(v):
            raise ValueError("a token budget (>= 1) must be a whole number")
        return v

    @property
    def keeps_all(self) -> bool:
        return self.value == 1

    @property
    def is_fraction(self) -> bool:
        return self.value < 1

    def tokens(self, num_prompt_tokens: int) -> int:
        """Tokens this request may keep."""
        if self.keeps_all:
            return max(num_prompt_tokens, 1)
        if self.is_fraction:
            return max(1, math.ceil(self.value * num_prompt_tokens))
        return int(self.value)

    def __str__(self) -> str:
        return f"{self.value:g}"


class CompressionSpec(BaseModel):
    model_config = ConfigDict(frozen=True)
    policy: Policy
    budget: Budget

    @property
    def keeps_all(self) -> bool:
        return self.budget.keeps_all

    def __str__(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.policy.params().items())
        return f"{self.policy.name}:{self.budget}" + (f",{params}" if params else "")


def _parse_number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise KVCompSpecError(f"{what} {text!r} is not a number") from None


def _from_fields(policy_name: str, budget: Any, params: dict[str, Any], source: str) -> CompressionSpec:
    """Build and validate a spec from already-split parts."""
    policy_name = str(policy_name).strip().lower()
    if policy_name not in POLICIES:
        raise KVCompSpecError(
            f"unknown policy {policy_name!r} in {source}; known: {', '.join(sorted(POLICIES))}, none"
        )
    policy_cls = POLICIES[policy_name]
    for key in params:
        if key not in policy_cls.model_fields:
            known = ", ".join(policy_cls.model_fields) or "none"
            raise KVCompSpecError(f"unknown key {key!r} for policy {policy_name!r} in {source}; known keys: {known}")
    try:
        b = Budget(value=budget)
    except ValidationError as e:
        raise KVCompSpecError(f"budget {budget!r} in {source}: {e.errors()[0]['msg']}") from None
    try:
        policy = policy_cls(**params)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise KVCompSpecError(f"{key}={params.get(key)!r} in {source}: {err['msg']}") from None
    if not b.keeps_all and not b.is_fraction and policy.min_tokens() > b.value:
        raise KVCompSpecError(
            f"budget {b} in {source} is smaller than sinks+window={policy.min_tokens()} that {policy_name} always keeps"
        )
    return CompressionSpec(policy=policy, budget=b)


def _load_yaml(path: str) -> CompressionSpec | None:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise KVCompSpecError(f"cannot read preset {path!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise KVCompSpecError(f"preset {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or "policy" not in data:
        raise KVCompSpecError(f"preset {path!r} must be a mapping with 'policy' (and 'budget')")
    data = dict(data)
    policy = data.pop("policy")
    if str(policy).strip().lower() == "none":
        return None
    if "budget" not in data:
        raise KVCompSpecError(f"preset {path!r} has no 'budget'")
    return _from_fields(policy, data.pop("budget"), data, f"preset {path!r}")


@functools.lru_cache(maxsize=256)
def parse_spec(text: str | None) -> CompressionSpec | None:
    """Parse a spec string; ``None`` means compression off."""
    if text is None:
        return None
    text = str(text).strip()
    if text == "" or text.lower() == "none":
        return None
    if text.endswith((".yaml", ".yml")):
        path = text if os.path.exists(text) else os.path.join(CONFIG_DIR, os.path.basename(text))
        return _load_yaml(path)
    policy_name, sep, rest = text.partition(":")
    if not sep:
        raise KVCompSpecError(f"spec {text!r} must look like policy:budget[,key=value...] (or 'none')")
    parts = [p.strip() for p in rest.split(",")]
    if not parts[0]:
        raise KVCompSpecError(f"spec {text!r} has no budget after '{policy_name}:'")
    budget = _parse_number(parts[0], "budget")
    params: dict[str, Any] = {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise KVCompSpecError(f"option {part!r} in {text!r} must be key=value")
        if key in params:
            raise KVCompSpecError(f"option {key!r} given twice in {text!r}")
        params[key] = value.strip()
    return _from_fields(policy_name, budget, params, f"spec {text!r}")


def resolve_request_spec(server_spec: str | None, extra_args: dict | None) -> CompressionSpec | None:
    """The spec a request runs with: its ``vllm_xargs.kv_compression`` override, else the
    server's. Compression off server-wide means the plugin's backend is not installed,
    so overrides are rejected at the front end (plugin.py) and ignored here."""
    server = parse_spec(server_spec)
    if server is None:
        return None
    if extra_args and extra_args.get("kv_compression") is not None:
        return parse_spec(str(extra_args["kv_compression"]))
    return server
