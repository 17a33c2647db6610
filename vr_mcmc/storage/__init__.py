"""Gradient tables with compressed storage, partition sampling and a memory planner (DESIGN.md §4)."""

from .planner import MemoryPlan, RowLayout, available_bytes, plan
from .svd import randomized_svd
from .table import GradientTable, TableTooLargeError

__all__ = ["GradientTable", "MemoryPlan", "RowLayout", "TableTooLargeError", "available_bytes", "plan",
           "randomized_svd"]
