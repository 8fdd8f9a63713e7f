"""Policy registry: one file per method; importing this package registers them all."""
from vllm_kvcomp.policies.base import POLICIES, Policy, ScoreContext, register_policy
from vllm_kvcomp.policies import cake, duo, h2o, keydiff, kvcrush, mikv, pyramidkv, snapkv, streaming  # noqa: F401  (registration)

__all__ = ["POLICIES", "Policy", "ScoreContext", "register_policy"]
