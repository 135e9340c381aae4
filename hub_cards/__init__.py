"""Hub card templates and their renderer (reads metrics files; imports no model)."""

from hub_cards.render import (
    DatasetCardInfo,
    ModelCardInfo,
    flatten_metrics,
    load_metrics,
    render_dataset_card,
    render_model_card,
)

__all__ = [
    "DatasetCardInfo",
    "ModelCardInfo",
    "flatten_metrics",
    "load_metrics",
    "render_dataset_card",
    "render_model_card",
]
