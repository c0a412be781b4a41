import math

import pytest
import torch

from fklip.model import ModelSpec, build_model
from fklip.schedule import (
    LOGIT_SCALE_MAX,
    build_optimizer,
    clamp_logit_scale,
    cosine_lr,
    is_no_decay,
)


def test_cosine_lr_is_the_originals():
    base, warmup, total = 1e-3, 10, 110
    assert cosine_lr(0, base, warmup, total) == pytest.approx(base / 10)
    assert cosine_lr(9, base, warmup, total) == pytest.approx(base)
    assert cosine_lr(10, base, warmup, total) == pytest.approx(base)  # cosine starts at the top
    assert cosine_lr(60, base, warmup, total) == pytest.approx(base / 2)
    assert cosine_lr(109, base, warmup, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)) * base)
    lrs = [cosine_lr(s, base, warmup, total) for s in range(total)]
    assert lrs[:10] == sorted(lrs[:10]) and lrs[10:] == sorted(lrs[10:], reverse=True)
    assert cosine_lr(0, base, 0, total) == pytest.approx(base)  # no warmup


def test_two_parameter_groups_follow_the_original_rule():
    model = build_model(ModelSpec.from_name("fklip-tiny"))
    opt = build_optimizer(model, lr=1e-4, wd=0.2)
    no_decay, decay = opt.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" in no_decay_names and "ln_final.weight" in no_decay_names
    assert "visual.ln_pre.bias" in no_decay_names and "transformer.resblocks.0.attn.in_proj_bias" in no_decay_names
    assert {"token_embedding.weight", "positional_embedding", "visual.class_embedding", "visual.proj",
            "text_projection", "visual.conv1.weight"} <= decay_names
    assert len(no_decay_names) + len(decay_names) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
    assert all(is_no_decay(n, None) == (n in no_decay_names) for n in names.values())


def test_logit_scale_is_clamped_to_ln_100():
    model = build_model(ModelSpec.from_name("fklip-tiny"))
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    clamp_logit_scale(model)
    assert float(model.logit_scale.detach()) == pytest.approx(LOGIT_SCALE_MAX) == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    clamp_logit_scale(model)
    assert float(model.logit_scale.detach()) == 0.0
