"""Reward models: one interface (`RewardModel`), a registry (`load`, `register`, `available`), adapters that
reproduce the official LAION aesthetic, ImageReward, HPS v2/v2.1, PickScore and CLIPScore implementations."""

from prefalign.rewards.base import RewardInfo, RewardModel
from prefalign.rewards.combine import WeightedSumReward
from prefalign.rewards.registry import available, load, parse_spec, register

__all__ = ["RewardInfo", "RewardModel", "WeightedSumReward", "available", "load", "parse_spec", "register"]
