"""Model-guided proposals (--model / --adapter) on a tiny random Depth Anything V2."""

from __future__ import annotations

import numpy as np
import torch

from tests.annotate.test_server import make_images
from westar.annotate.guide import make_score_fn, normalized
from westar.annotate.store import AnnotationSession
from westar.cli import main


def save_adapter(model_dir, out, random_b: bool):
    from westar.model import add_lora, load_depth_model

    torch.manual_seed(0)
    peft_model = add_lora(load_depth_model(str(model_dir)).model, rank=2, alpha=4)
    if random_b:  # a trained-looking adapter: the student now differs from the teacher
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    peft_model.save_pretrained(str(out))
    return out


def test_normalized_is_scale_and_shift_invariant():
    x = np.random.default_rng(0).uniform(1, 5, (7, 9))
    assert np.allclose(normalized(3.0 * x + 2.0), normalized(x))


def test_teacher_student_disagreement(tiny_model, tmp_path):
    images = make_images(tmp_path / "images", n=2, size=(42, 56))
    path = images / "im0.png"
    same = make_score_fn(str(tiny_model), str(save_adapter(tiny_model, tmp_path / "a0", False)),
                         size=42, device="cpu")(path, 56, 42)  # fmt: skip
    assert same.shape == (42, 56) and np.allclose(same, 0, atol=1e-4)  # B = 0: identical
    fn = make_score_fn(str(tiny_model), str(save_adapter(tiny_model, tmp_path / "a1", True)),
                       size=42, device="cpu")  # fmt: skip
    score = fn(path, 56, 42)
    assert score.shape == (42, 56) and np.isfinite(score).all() and score.min() >= 0
    assert score.max() > 1e-2
    flip = make_score_fn(str(tiny_model), size=42, device="cpu")(path, 56, 42)
    assert flip.shape == (42, 56) and np.isfinite(flip).all() and flip.max() > 0

    s = AnnotationSession(images, tmp_path / "p.json", score_fn=fn)
    guided = s.image_state(0)["samples"]
    plain = AnnotationSession(images, tmp_path / "q.json").image_state(0)["samples"]
    assert guided != plain

    def mean_score(samples):
        return np.mean([score[s[n][1], s[n][0]] for s in samples for n in ("anchor", "p", "q")])

    # the guided points sit where the models disagree
    assert mean_score(guided) > mean_score(plain)


def test_bad_adapter_exits_2(tiny_model, tmp_path, capsys):
    images = make_images(tmp_path / "images", n=1)
    args = ["annotate", "--images", str(images), "--out", str(tmp_path / "p.json"), "--port",
            "0", "--model", str(tiny_model), "--adapter", str(tmp_path)]  # fmt: skip
    assert main(args) == 2
    assert "not a peft adapter" in capsys.readouterr().err
