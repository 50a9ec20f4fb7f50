"""Rows of one batch on different adapters (mixed-adapter batches), over the LoRA layers' router
hook: the layers know nothing of it."""

from lorakit.rows.plan import (
    RowPlan,
    RowSegment,
    row_segments,
    rows_use_adapters,
    rows_use_plan,
)

__all__ = ["RowPlan", "RowSegment", "row_segments", "rows_use_adapters", "rows_use_plan"]
