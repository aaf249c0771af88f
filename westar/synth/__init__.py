"""Offline demo data: procedural scenes with exact depth and instances, and the small
source depth model pretrained on them (see westar.corrupt for the corruption suite)."""

from .dataset import list_stems, read_sample, write_dataset, write_sample
from .scenes import Scene, SceneParams, render_scene
from .source import load_source_model, source_model_path

__all__ = [
    "Scene",
    "SceneParams",
    "render_scene",
    "write_dataset",
    "write_sample",
    "read_sample",
    "list_stems",
    "load_source_model",
    "source_model_path",
]
