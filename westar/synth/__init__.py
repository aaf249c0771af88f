"""Offline demo data: procedural scenes with exact depth and instances (two families: indoor
rooms, `scenes`, and outdoor streets, `streets`; `render(family, seed)` for either), and the
small source depth model pretrained on them (see westar.corrupt for the corruption suite)."""

from .dataset import list_stems, read_sample, write_dataset, write_sample, write_split_scene
from .families import FAMILIES, render
from .scenes import Scene, SceneParams, render_scene
from .source import load_source_model, source_model_path
from .streets import StreetParams, render_street

__all__ = [
    "Scene",
    "SceneParams",
    "render_scene",
    "write_dataset",
    "write_sample",
    "write_split_scene",
    "read_sample",
    "list_stems",
    "load_source_model",
    "source_model_path",
    "StreetParams",
    "render_street",
    "FAMILIES",
    "render",
]
