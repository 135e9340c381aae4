"""Hub card templates and their renderer (reads metrics files; imports no model)."""

from hub_cards.render import (
    AdapterCardInfo,
    DatasetCardInfo,
    ModelCardInfo,
    flatten_metrics,
    load_metrics,
    PropertySummary,
    render_adapter_card,
    render_dataset_card,
    render_model_card,
)

__all__ = [
    "AdapterCardInfo",
    "DatasetCardInfo",
    "ModelCardInfo",
    "flatten_metrics",
    "load_metrics",
    "PropertySummary",
    "render_adapter_card",
    "render_dataset_card",
    "render_model_card",
]
