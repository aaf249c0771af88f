"""The trainer's weak-label term: ordinal_norm="global" (the scale-free term, reusing the
SA-HDN forward's global statistics) and "raw" (the ordinal loss on the raw output)."""

from __future__ import annotations

import pytest
import torch

import westar_ops
from westar.config import TrainConfig
from westar.losses import westar_loss
from westar_ops import reference


def _inputs(seed=0, b=3, h=14, w=21, p=30):
    gen = torch.Generator().manual_seed(seed)
    student = torch.rand(b, h, w, generator=gen) * 3 + 0.5
    teacher = torch.rand(b, h, w, generator=gen) * 3 + 0.5
    teacher[0, :2] = float("nan")  # unusable pixels (as a padded teacher would have)
    ys = torch.randint(0, h, (b, p, 2), generator=gen)
    xs = torch.randint(0, w, (b, p, 2), generator=gen)
    labels = torch.randint(-1, 2, (b, p), generator=gen)
    labels[1, -4:] = -100  # padding
    batch = {"pairs": torch.stack([ys, xs], -1), "labels": labels}
    return student, teacher, batch


def _cfg(**kw):
    base = dict(lambda_st=1.0, lambda_w=0.7, lambda_r=0.0, hdn="grid", margin=0.25)
    return TrainConfig(**{**base, **kw})


def _expected(student, teacher, batch, cfg):
    """The same objective from westar_ops.reference."""
    valid = torch.isfinite(teacher)
    total = student.new_zeros(())
    if cfg.lambda_st > 0:
        instances = None
        if cfg.hdn == "grid":
            instances = reference.grid_instances(*student.shape, cfg.grid)
        total = total + cfg.lambda_st * reference.sa_hdn_loss(
            student, teacher, instances, valid,
            include_global=cfg.include_global or cfg.hdn == "global",
            stats_grad=cfg.stats_grad,
        )  # fmt: skip
    kw = dict(margin=cfg.margin, kind=cfg.ordinal_kind, equal_weight=cfg.equal_weight)
    if cfg.ordinal_norm == "global":
        weak = reference.normalized_ordinal_ranking_loss(
            student, batch["pairs"], batch["labels"], valid=valid, stats_grad=cfg.stats_grad, **kw
        )
    else:
        weak = reference.ordinal_ranking_loss(student, batch["pairs"], batch["labels"], **kw)
    return total + cfg.lambda_w * weak, weak


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"hdn": "global", "stats_grad": "scale", "ordinal_kind": "logistic"},
        {"include_global": False},  # no global context in SA-HDN: stats computed by torch
        {"lambda_st": 0.0},  # no SA-HDN at all: likewise
        {"ordinal_norm": "raw"},
        {"ordinal_norm": "raw", "hdn": "global", "ordinal_kind": "logistic"},
    ],
)
def test_westar_loss_matches_the_reference_composition(overrides):
    cfg = _cfg(**overrides)
    student, teacher, batch = _inputs()
    x = student.clone().requires_grad_(True)
    total, parts = westar_loss(x, teacher, batch, None, cfg)
    (grad,) = torch.autograd.grad(total, x)
    y = student.clone().requires_grad_(True)
    expected, weak = _expected(y, teacher, batch, cfg)
    (grad_ref,) = torch.autograd.grad(expected, y)
    torch.testing.assert_close(parts["weak"], weak.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)
    assert float(parts["weak"]) > 0


def test_global_term_reuses_the_sa_hdn_stats(monkeypatch):
    """With SA-HDN's global context on, the ordinal term gets its stats (no second pass)."""
    seen = []
    original = westar_ops.normalized_ordinal_ranking_loss

    def spy(*args, **kw):
        seen.append(kw)
        return original(*args, **kw)

    monkeypatch.setattr(westar_ops, "normalized_ordinal_ranking_loss", spy)
    student, teacher, batch = _inputs()
    westar_loss(student, teacher, batch, None, _cfg())
    assert isinstance(seen[-1]["stats"], westar_ops.NormalizationStats)
    assert seen[-1]["valid"] is None
    westar_loss(student, teacher, batch, None, _cfg(lambda_st=0.0))
    assert seen[-1]["stats"] is None and seen[-1]["valid"] is not None


def test_weak_term_is_scale_free_only_when_normalized():
    """Up to eps = 1e-6 against a deviation of ~0.075 at the smallest scale."""
    student, teacher, batch = _inputs()
    for norm, free in (("global", True), ("raw", False)):
        cfg = _cfg(ordinal_norm=norm)
        weak = [float(westar_loss(student * c, teacher, batch, None, cfg)[1]["weak"])
                for c in (1.0, 0.1, 10.0)]  # fmt: skip
        same = all(abs(v - weak[0]) <= 1e-4 * weak[0] for v in weak[1:])
        assert same == free, (norm, weak)


def test_ordinal_norm_flag():
    from westar.cli import build_parser, config_from_args

    assert TrainConfig().ordinal_norm == "global"
    args = build_parser().parse_args(["train", "--data", "d", "--ordinal-norm", "raw"])
    assert config_from_args(args).ordinal_norm == "raw"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--ordinal-norm", "median"])
    with pytest.raises(ValueError, match="ordinal_norm"):
        TrainConfig(ordinal_norm="median")
