"""Postprocessors applied to a run's samples after sampling (``postprocess=`` config group).

``flow``: the flow-matching postprocessor of Zhao & Schwing 2025 (arXiv 2503.10638).
"""

from cfgx.postprocess.flow import (
    DEFAULTS,
    FlowPostprocessor,
    VelocityMLP,
    VelocityUNet,
    apply_flow,
    build_velocity_net,
    flow_loss,
    knn_indices,
    knn_target_indices,
    knn_targets,
    train_flow,
    train_postprocessor,
)

__all__ = ["DEFAULTS", "FlowPostprocessor", "VelocityMLP", "VelocityUNet", "apply_flow", "build_velocity_net",
           "flow_loss", "knn_indices", "knn_target_indices", "knn_targets", "train_flow",
           "train_postprocessor"]
