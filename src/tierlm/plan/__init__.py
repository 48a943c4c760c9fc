"""The planner: bytes, placement, roofline and cost. Imports no torch."""

from .planner import Options, Plan, plan

__all__ = ["Options", "Plan", "plan"]
