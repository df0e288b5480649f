"""diffusers pipelines of gear_hf."""

from .pipeline_gear import (
    GEARPipeline,
    GEARPipelineOutput,
    check_components_compatible,
    imagenet_id2label,
    to_uint8,
)

__all__ = ["GEARPipeline", "GEARPipelineOutput", "check_components_compatible", "imagenet_id2label", "to_uint8"]
