"""Postprocessors applied to a run's samples after sampling (``postprocess=`` config group).

``flow``: the flow-matching postprocessor of Zhao & Schwing 2025 (arXiv 2503.10638). Its pieces:
``settings`` (FlowSettings, read from configs/postprocess/flow.yaml), ``pairs`` (generated samples
and their kNN real partners), ``nets`` (velocity networks), ``flow`` (train, apply, FlowPostprocessor).
"""

from cfgx.postprocess.flow import (
    FlowPostprocessor,
    apply_flow,
    flow_loss,
    ignored_settings,
    train_flow,
    train_postprocessor,
)
from cfgx.postprocess.nets import VelocityMLP, VelocityUNet, build_velocity_net
from cfgx.postprocess.pairs import knn_indices, knn_target_indices, knn_targets
from cfgx.postprocess.settings import FlowSettings

__all__ = ["FlowPostprocessor", "FlowSettings", "VelocityMLP", "VelocityUNet", "apply_flow", "build_velocity_net",
           "flow_loss", "ignored_settings", "knn_indices", "knn_target_indices", "knn_targets", "train_flow",
           "train_postprocessor"]
