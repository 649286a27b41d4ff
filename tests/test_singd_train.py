"""``kfac-train --optimizer singd-*|ingd|ikfac``."""
import pytest

from kfac_kernels.apps.defaults import SINGD_OPTIMIZERS, default_lr
from kfac_kernels.apps.train import build_parser, main, run


def test_singd_diagonal_bf16_reaches_090_test_accuracy(capsys):
    assert main(["--optimizer", "singd-diagonal", "--dtype", "bfloat16", "--steps", "300",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    acc = float(out.split("test  accuracy")[1].split()[0])
    assert acc >= 0.9, out


@pytest.mark.parametrize("optimizer,extra", [("ikfac", []), ("singd-hierarchical", []),
                                             ("singd-diagonal", ["--singd-fused", "--dtype",
                                                                 "bfloat16"])])
def test_other_variants_train(optimizer, extra):
    # at kfac-train's defaults for the family (warm-started factors, lr 0.005: ten times that
    # diverges once the factors follow the curvature)
    args = build_parser().parse_args(["--optimizer", optimizer, "--steps", "40", "--no-progress",
                                      "--lr", str(default_lr("digits", optimizer)),
                                      "--weight-decay", "0", *extra])
    result = run(args)
    assert result["train_loss"] < 1.0, result["train_loss"]


def test_every_structure_is_an_optimizer_choice():
    from kfac_kernels.singd import STRUCTURES
    assert {f"singd-{name}" for name in STRUCTURES} <= set(SINGD_OPTIMIZERS)


def test_bad_singd_flags_are_rejected(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--optimizer", "ingd", "--block-size", "0"])
    assert "--block-size: expected a positive integer, got 0" in capsys.readouterr().err
