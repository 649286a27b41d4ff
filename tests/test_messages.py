"""Error messages that say what was wrong: too-large reflect/circular padding named by the op,
a SINGD state of another model with the shapes that differ."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from kfac_kernels import SINGD
from kfac_kernels.ops import patch_covariance


@pytest.mark.parametrize("mode,padding,limit", [("reflect", 3, "the size - 1"),
                                                ("circular", 4, "the size")])
def test_too_large_padding_is_named_by_the_op(mode, padding, limit):
    with pytest.raises(ValueError, match=re.escape(
            f"patch_covariance: padding {padding} is too large for padding_mode={mode!r} and an "
            f"input of spatial size (3, 3): {mode} padding must be at most {limit} in each dim")):
        patch_covariance(torch.randn(2, 1, 3, 3), 3, padding=padding, padding_mode=mode)


def test_singd_state_of_another_model_names_the_shapes():
    def trained(width):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 2))
        opt = SINGD(model, lr=0.1, lr_cov=0.1, T=1, structures="diagonal")
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(6, 4)), torch.zeros(6).long()).backward()
        opt.step()
        return opt

    with pytest.raises(ValueError, match=re.escape(
            "SINGD.load_state_dict: C of module '0' has shapes [(5,)]; this optimizer's is "
            "[(3,)] (saved from another model or with other structures?)")):
        trained(3).load_state_dict(trained(5).state_dict())
