"""Model-guided proposals: a score map per image, high where two predictions disagree.

With an adapter: the base model (teacher side, adapter disabled) against the adapted
model (student); without one: the model against itself on the mirrored image (a cheap
uncertainty estimate). Both disparities are first normalised per image (median and mean
absolute deviation), so only disagreements in relative depth, which is what a person's
answer settles, count.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["make_score_fn", "normalized"]


def normalized(x: np.ndarray) -> np.ndarray:
    """(x - median) / mean |x - median| of a (H, W) map (scale- and shift-invariant)."""
    med = np.median(x)
    mad = np.mean(np.abs(x - med))
    return (x - med) / max(float(mad), 1e-12)


def make_score_fn(
    model: str, adapter: str | None = None, size: int | None = None, device: str | None = None
) -> Callable[[Path, int, int], np.ndarray]:
    """fn(image path, width, height) -> (height, width) disagreement map, float64 >= 0.

    Loads the model (and adapter) once, before the server starts, so a bad path fails
    at once with a clear message.
    """
    import torch

    from westar.data import read_image
    from westar.evaluate import _predict_image
    from westar.model import load_depth_model

    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: not a peft adapter (no adapter_config.json)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    depth_model = load_depth_model(model)
    net = depth_model.model.to(dev).eval()
    if adapter is not None:
        from westar.model import load_adapter

        net = load_adapter(net, adapter).eval()
    infer = size or depth_model.input_size

    def score(path: Path, width: int, height: int) -> np.ndarray:
        rgb = read_image(path)
        if adapter is not None:
            student = _predict_image(net, depth_model, rgb, infer, dev)
            with net.disable_adapter():
                other = _predict_image(net, depth_model, rgb, infer, dev)
        else:
            student = _predict_image(net, depth_model, rgb, infer, dev)
            flipped = np.ascontiguousarray(rgb[:, ::-1])
            other = _predict_image(net, depth_model, flipped, infer, dev)[:, ::-1]
        return np.abs(normalized(student) - normalized(other)).astype(np.float64)

    return score
