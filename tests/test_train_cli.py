"""The ``kfac-train`` command (kfac_kernels.apps.train), its data set and its model."""
from __future__ import annotations

import functools
import json
import warnings
import statistics
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from kfac_kernels.apps.data import load_digits_split
from kfac_kernels.apps.models import DigitsCNN, build_digits_cnn
from kfac_kernels.apps.defaults import default_lr
from kfac_kernels.kfac import DEFAULT_RELATIVE_DAMPING
from kfac_kernels.apps.train import BatchSampler, _make_optimizer, build_parser, main

REQUIRED_KEYS = {"optimizer", "steps", "batch_size", "lr", "seed", "device", "dtype",
                 "train_loss", "train_accuracy", "test_loss", "test_accuracy", "wall_time_s",
                 "steps_per_s", "history"}


def _train(tmp_path, *args: str) -> dict:
    path = tmp_path / "metrics.json"
    assert main([*args, "--no-progress", "--json", str(path)]) == 0
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_metrics(result: dict, optimizer: str, steps: int) -> None:
    assert REQUIRED_KEYS <= set(result)
    assert result["optimizer"] == optimizer
    assert result["steps"] == steps
    assert result["batch_size"] == 64
    assert result["lr"] == default_lr("digits", optimizer)
    assert result["device"] == "cpu"
    for key in ("train_loss", "test_loss"):
        assert math.isfinite(result[key]) and result[key] >= 0, key
    for key in ("train_accuracy", "test_accuracy"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["wall_time_s"] > 0 and result["steps_per_s"] > 0
    steps_logged = [h["step"] for h in result["history"]]
    assert steps_logged == sorted(steps_logged) and steps_logged[-1] == steps
    for entry in result["history"]:
        assert math.isfinite(entry["train_batch_loss"])
        assert entry["elapsed_s"] > 0
    evals = result["evaluations"]
    assert evals and evals[-1]["step"] == steps
    assert evals[-1]["test_accuracy"] == pytest.approx(result["test_accuracy"])
    target = result["target"]
    assert target["metric"] == "test_accuracy" and target["value"] == 0.97
    if target["reached_at_step"] is not None:  # the first evaluation that met the target
        first = next(e for e in evals if e["test_accuracy"] >= 0.97)
        assert target["reached_at_step"] == first["step"]
    assert result["optimizer_state_bytes"] >= 0 and result["peak_rss_bytes"] > 0


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "kfac"])
def test_short_run_writes_sane_json(tmp_path, capsys, optimizer):
    result = _train(tmp_path, "--optimizer", optimizer, "--steps", "20")
    _check_metrics(result, optimizer, 20)
    assert [h["step"] for h in result["history"]] == [10, 20]
    # 20 steps already learn something on 10 classes.
    assert result["test_accuracy"] > 0.3
    out = capsys.readouterr().out
    assert "test  accuracy" in out and "wall time" in out


def test_runs_are_reproducible(tmp_path):
    a = _train(tmp_path, "--optimizer", "kfac", "--steps", "12", "--seed", "3")
    b = _train(tmp_path, "--optimizer", "kfac", "--steps", "12", "--seed", "3")
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert a[key] == b[key], key
    assert [h["train_batch_loss"] for h in a["history"]] == [
        h["train_batch_loss"] for h in b["history"]]


def test_denormals_are_flushed_during_the_run_and_recorded(tmp_path, monkeypatch):
    """--denormals flush (the default) turns flushing on for the run only; keep leaves it off.
    (The flag's state has no getter: it is observed through what a subnormal becomes.)"""
    import kfac_kernels.apps.train as train_mod

    seen = []
    real = train_mod._run

    def spy(args):
        tiny = torch.tensor(torch.finfo(torch.float32).tiny)
        seen.append(bool((tiny / 4 == 0).item()))   # flushed: the subnormal result is 0
        return real(args)

    monkeypatch.setattr(train_mod, "_run", spy)
    flushed = _train(tmp_path, "--optimizer", "sgd", "--steps", "2")
    kept = _train(tmp_path, "--optimizer", "sgd", "--steps", "2", "--denormals", "keep")
    assert flushed["denormals"] == "flush" and kept["denormals"] == "keep"
    if torch.set_flush_denormal(True):            # the CPU supports flushing
        torch.set_flush_denormal(False)
        assert seen == [True, False]
    tiny = torch.tensor(torch.finfo(torch.float32).tiny)
    assert (tiny / 4).item() > 0                  # off again after the run


def test_same_batches_and_initial_weights_for_every_optimizer():
    # The mini-batch order depends only on (n, batch size, seed) ...
    s1, s2 = (BatchSampler(100, 32, seed=5, device=torch.device("cpu")) for _ in range(2))
    seq1 = [s1.next() for _ in range(10)]
    seq2 = [s2.next() for _ in range(10)]
    assert all(torch.equal(a, b) for a, b in zip(seq1, seq2))
    # ... each epoch is a permutation (the incomplete last batch is dropped) ...
    epoch = torch.cat(seq1[:3])
    assert epoch.numel() == 96 and epoch.unique().numel() == 96
    # ... and the initial weights only on the seed.
    m1, m2, m3 = build_digits_cnn(5), build_digits_cnn(5), build_digits_cnn(6)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(m1.parameters(), m3.parameters()))


def test_same_seed_gives_same_first_loss_across_optimizers(tmp_path):
    # One step: the loss of the first batch is computed before any update, so it must agree.
    first = {}
    for optimizer in ("sgd", "adamw", "kfac"):
        result = _train(tmp_path, "--optimizer", optimizer, "--steps", "1", "--seed", "2")
        first[optimizer] = result["history"][0]["train_batch_loss"]
    assert first["sgd"] == first["adamw"] == first["kfac"]


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_other_dtypes(tmp_path, dtype):
    result = _train(tmp_path, "--optimizer", "kfac", "--steps", "10", "--dtype", dtype,
                    "--log-every", "5")
    assert result["dtype"] == dtype
    assert math.isfinite(result["train_loss"]) and math.isfinite(result["test_loss"])
    assert [h["step"] for h in result["history"]] == [5, 10]


def test_kfac_options_are_passed_through(tmp_path):
    result = _train(tmp_path, "--optimizer", "kfac", "--steps", "6", "--kfac-approx", "reduce",
                    "--damping-form", "factored", "--kl-clip", "1e-2", "--damping", "0.1",
                    "--inv-update-steps", "3", "--lr", "0.01")
    assert result["kfac_approx"] == "reduce" and result["damping"] == 0.1
    assert result["lr"] == 0.01
    assert math.isfinite(result["train_loss"])


def test_update_periods_default_per_optimizer_and_are_recorded(tmp_path):
    """bdkfac takes kfac-train's periods (factors every 5 steps, inverses every 50), kfac the
    library's (1, 10); the command line overrides either; the JSON records what ran, and the
    preconditioner was built with it."""
    from kfac_kernels.apps.defaults import UPDATE_STEPS

    args = build_parser().parse_args(["--optimizer", "bdkfac", "--lr", "0.003",
                                      "--weight-decay", "0.01", "--damping", "0.1"])
    precond = _make_optimizer(args, build_digits_cnn(0)).preconditioner
    assert (precond.factor_update_steps, precond.inv_update_steps) == UPDATE_STEPS["bdkfac"]
    bd = _train(tmp_path, "--optimizer", "bdkfac", "--steps", "2")
    assert (bd["factor_update_steps"], bd["inv_update_steps"]) == UPDATE_STEPS["bdkfac"] == (5, 50)
    kf = _train(tmp_path, "--optimizer", "kfac", "--steps", "2")
    assert (kf["factor_update_steps"], kf["inv_update_steps"]) == (1, 10)
    own = _train(tmp_path, "--optimizer", "bdkfac", "--steps", "2", "--factor-update-steps", "3")
    assert (own["factor_update_steps"], own["inv_update_steps"]) == (3, 50)
    assert _train(tmp_path, "--optimizer", "adamw", "--steps", "1")["inv_update_steps"] is None


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
    (["--steps", "0"], "expected a positive integer"),
    (["--steps", "ten"], "expected a positive integer"),
    (["--batch-size", "-4"], "expected a positive integer"),
    (["--lr", "-0.1"], "expected a positive finite number"),
    (["--lr", "nan"], "expected a positive finite number"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--momentum", "1.5"], "expected a momentum in [0, 1)"),
    (["--factor-decay", "1"], "--factor-decay must be in [0, 1)"),
    (["--optimizer", "sgd", "--damping", "0.1"], "--damping only applies to --optimizer kfac"),
    (["--json", "/nonexistent-folder/x.json"], "does not exist"),
])
def test_bad_arguments_exit_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as err:
        main(argv + ["--no-progress"])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_cuda_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cuda", "--no-progress"])
    assert "no CUDA device is available" in capsys.readouterr().err


def _help_texts() -> dict[str, str]:
    """Every option's help text as ``--help`` prints it (defaults expanded)."""
    from kfac_kernels.apps.train import build_parser
    parser = build_parser()
    formatter = parser._get_formatter()
    return {action.option_strings[-1]: formatter._expand_help(action)
            for action in parser._actions if action.option_strings and action.help}


def test_help_gives_each_default_once():
    """No option's help says its default twice (its own text and argparse's suffix) or shows
    ``(default: None)`` for a default that depends on the optimizer or the task."""
    texts = _help_texts()
    assert "--lr" in texts and "--damping" in texts
    for option, text in texts.items():
        assert text.count("(default") <= 1, (option, text)
        assert "(default: None)" not in text and "(default: False)" not in text, (option, text)
    assert "(default per task:" in texts["--target"]
    assert "largest eigenvalue" in texts["--damping"]


def test_help_learning_rates_are_the_ones_every_task_runs():
    """--lr's help gives one default per optimizer, "the same on every task": it is."""
    from kfac_kernels.apps.defaults import DEFAULT_LR, OPTIMIZERS
    from kfac_kernels.apps.workloads import WORKLOADS
    text = _help_texts()["--lr"]
    assert "the same on every task" in text
    for task in WORKLOADS:
        for optimizer in OPTIMIZERS:
            assert default_lr(task, optimizer) == DEFAULT_LR[optimizer], (task, optimizer)
            if DEFAULT_LR[optimizer] is not None:
                assert f"{DEFAULT_LR[optimizer]:g} for" in text


def _error_line(capsys, argv) -> str:
    """The one line that ``argv`` ends with (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as err:
        main(argv + ["--no-progress"])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("kfac-train: error: ")
    assert not any("Traceback" in line for line in lines)
    return lines[-1]


def test_unavailable_backend_is_a_one_line_error(capsys, monkeypatch):
    if not torch.cuda.is_available():
        line = _error_line(capsys, ["--optimizer", "kfac", "--backend", "cuda"])
        assert "--backend cuda is not available on cpu" in line and "eager" in line
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton runs on CPU only interpreted
    line = _error_line(capsys, ["--optimizer", "singd-diagonal", "--backend", "triton"])
    assert "--backend triton is not available on cpu" in line


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "adamw", "--backend", "eager"],
     "--backend only applies to the K-FAC and SINGD optimizers"),
    (["--optimizer", "kfac", "--lr-cov", "0.1"], "--lr-cov only applies to the SINGD family"),
    (["--optimizer", "singd-diagonal", "--block-size", "8"],
     "--block-size only applies to --optimizer singd-block-diagonal"),
    (["--optimizer", "ingd", "--singd-fused"],
     "--singd-fused only applies to --optimizer singd-diagonal or singd-block-diagonal"),
    (["--optimizer", "ikfac", "--alpha1", "0.3"], "--alpha1 only applies to the SINGD family"),
    (["--optimizer", "kfac-adaptive", "--kl-clip", "0.01"],
     "--kl-clip only applies to --optimizer kfac or bdkfac"),
    (["--optimizer", "kfac-adaptive", "--schedule", "cosine"],
     "--schedule only applies to optimizers with a learning rate"),
    (["--optimizer", "bdkfac", "--damping-form", "factored"],
     "--damping-form only applies to --optimizer kfac"),
    (["--optimizer", "adamw", "--momentum", "0.5"], "--momentum only applies to"),
    (["--compare", "adamw,sgd", "--damping", "0.1"],
     "--damping only applies to --optimizer kfac, bdkfac or the adaptive ones, not to any of "
     "the compared optimizers"),
])
def test_option_for_another_optimizer_is_refused(capsys, argv, message):
    assert message in _error_line(capsys, argv)


def test_options_for_the_chosen_optimizer_pass_the_checks():
    from kfac_kernels.apps.train import _check_args, build_parser
    parser = build_parser()
    for argv in (["--optimizer", "bdkfac-adaptive", "--num-blocks", "2"],
                 ["--optimizer", "singd-diagonal", "--backend", "eager", "--singd-fused"],
                 ["--optimizer", "ingd", "--kfac-approx", "reduce", "--momentum", "0.5"],
                 ["--compare", "adamw,singd-diagonal", "--lr-cov", "0.1"]):
        _check_args(parser, parser.parse_args(argv))


def test_batch_size_larger_than_the_training_set(capsys):
    """A one-line error and exit status 2 (it was a traceback), alone and inside --compare."""
    assert main(["--batch-size", "100000", "--steps", "1", "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["kfac-train: error: --batch-size 100000 exceeds the 1438 training examples "
                     "of the task; use at most 1438"]


def test_help_runs_as_a_module_and_as_the_console_script():
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "kfac_kernels.apps.train", "--help"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "--optimizer" in proc.stdout
    script = shutil.which("kfac-train")
    if script is not None:  # installed with pip (as in the README)
        proc = subprocess.run([script, "--help"], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 0 and "kfac-train" in proc.stdout


def test_digits_split():
    split = load_digits_split(0)
    n_train, n_test = split.x_train.shape[0], split.x_test.shape[0]
    assert n_train + n_test == 1797
    assert split.x_train.shape[1:] == (1, 8, 8) and split.x_test.shape[1:] == (1, 8, 8)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    assert abs(n_test / 1797 - 0.2) < 0.01
    # Stratified: every class has about the same share in both sets.
    train_share = torch.bincount(split.y_train, minlength=10) / n_train
    test_share = torch.bincount(split.y_test, minlength=10) / n_test
    assert (train_share - test_share).abs().max() < 0.01
    # Standardised with the training statistics.
    assert abs(float(split.x_train.mean())) < 1e-5
    assert abs(float(split.x_train.std()) - 1) < 1e-4
    # Fixed by the seed; a different seed gives a different split.
    again = load_digits_split(0, dtype=torch.float64)
    assert torch.equal(again.y_test, split.y_test)
    assert torch.allclose(again.x_test.float(), split.x_test)
    assert not torch.equal(load_digits_split(1).y_test, split.y_test)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(0, test_fraction=1.0)


def test_digits_cnn_shapes():
    model = DigitsCNN()
    out = model(torch.zeros(3, 1, 8, 8))
    assert out.shape == (3, 10)


def test_kfac_default_reaches_95_percent(tmp_path):
    """The acceptance run: ``kfac-train --optimizer kfac --steps 300`` (seed 0)."""
    result = _train(tmp_path, "--optimizer", "kfac", "--steps", "300")
    _check_metrics(result, "kfac", 300)
    assert result["test_accuracy"] >= 0.95, result["test_accuracy"]


def test_bdkfac_default_reaches_95_percent(tmp_path):
    """``kfac-train --optimizer bdkfac --steps 300`` (seed 0): BD-KFAC over AdamW."""
    result = _train(tmp_path, "--optimizer", "bdkfac", "--steps", "300")
    _check_metrics(result, "bdkfac", 300)
    assert result["num_blocks"] == 4 and result["damping"] == DEFAULT_RELATIVE_DAMPING
    assert result["inv_warmup_steps"] == 20
    assert result["test_accuracy"] >= 0.95, result["test_accuracy"]


def test_bdkfac_options_are_passed_through(tmp_path):
    result = _train(tmp_path, "--optimizer", "bdkfac", "--steps", "6", "--num-blocks", "2",
                    "--kfac-approx", "reduce", "--kl-clip", "1e-3", "--damping", "0.1")
    assert result["num_blocks"] == 2 and result["kfac_approx"] == "reduce"
    assert math.isfinite(result["train_loss"])


@pytest.mark.parametrize("optimizer,argv,expected", [
    ("bdkfac", [], 20), ("bdkfac", ["--inv-warmup-steps", "0"], 0),
    ("kfac", [], 0), ("kfac", ["--inv-warmup-steps", "7"], 7)])
def test_inv_warmup_steps_reach_the_preconditioner(monkeypatch, optimizer, argv, expected):
    """BD-KFAC's default warm-up of the inverses is kfac-train's (20), K-FAC's the
    library's (0); --inv-warmup-steps overrides both, and the preconditioner gets it."""
    from kfac_kernels import KFAC
    made = []
    original = KFAC.__init__

    @functools.wraps(original)       # kfac-train reads the library's defaults off it
    def spy(self, *a, **kw):
        original(self, *a, **kw)
        made.append(self.inv_warmup_steps)

    monkeypatch.setattr(KFAC, "__init__", spy)
    args = build_parser().parse_args(["--optimizer", optimizer, *argv])
    if args.lr is None:
        args.lr = 0.01
    if args.damping is None:
        args.damping = DEFAULT_RELATIVE_DAMPING
    if args.weight_decay is None:
        args.weight_decay = 0.0
    from kfac_kernels.apps.workloads import WORKLOADS
    workload = WORKLOADS["digits"]
    model = workload.build_model(0, torch.float32, torch.device("cpu"), None)
    _make_optimizer(args, model, workload)
    assert made == [expected]


def test_num_blocks_only_for_bdkfac(capsys):
    with pytest.raises(SystemExit):
        main(["--optimizer", "kfac", "--num-blocks", "2", "--no-progress"])
    assert "--num-blocks only applies to --optimizer bdkfac" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["digits-vit", "char-lm", "deep-linear", "graphs",
                                  "digits-autoencoder", "digits-bn"])
@pytest.mark.parametrize("optimizer", ["adamw", "kfac", "kfac-adaptive"])
def test_other_tasks_train(tmp_path, task, optimizer):
    extra = []
    if (task, optimizer) == ("graphs", "kfac"):
        # SGD over K-FAC with the default relative damping spikes on the GNN at batch size 16
        # (the weakly damped directions); an absolute damping of 0.3 trains it
        extra = ["--damping", "0.3", "--absolute-damping", "--lr", "0.02"]
    batch = "16"
    if (task, optimizer) == ("digits-vit", "kfac-adaptive"):
        # AdaptiveKFAC does not train the ViT from batches of 16: its MC Fisher and quadratic
        # model from 16 examples are too noisy (batch loss at chance after 30 steps for
        # initial dampings 1, 0.1 and 0.01 on seeds 0-2, test loss 7.9 after 120 steps on seed
        # 0). From batches of 64 it learns on seeds 0-2 (batch loss 2.30-2.36 -> 2.02-2.11).
        batch = "64"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _train(tmp_path, "--task", task, "--optimizer", optimizer, "--steps", "30",
                        "--batch-size", batch, "--eval-every", "15", "--log-every", "10", *extra)
    # The package's own tasks say what they leave to the base optimizer: no warning about
    # their own models' layers
    about_itself = [str(w.message) for w in caught if "no Kronecker-factored" in str(w.message)]
    assert not about_itself, about_itself
    assert result["task"] == task
    assert math.isfinite(result["train_loss"]) and math.isfinite(result["test_loss"])
    first_loss = result["history"][0]["train_batch_loss"]
    assert result["history"][-1]["train_batch_loss"] < first_loss  # it learns something
    assert [e["step"] for e in result["evaluations"]] == [15, 30]


def test_compare_table_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    assert main(["--compare", "adamw,kfac", "--steps", "30", "--seeds", "0,1",
                 "--eval-every", "10", "--target", "test_accuracy=0.5", "--no-progress",
                 "--json", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "optimizer | lr | target reached | steps to target | CPU time to target" in text
    data = json.loads(out.read_text())
    assert [r["optimizer"] for r in data["summary"]] == ["adamw", "kfac"]
    for row in data["summary"]:
        assert row["seeds"] == [0, 1] and row["target"] == "test_accuracy=0.5"
        runs = data["runs"][row["optimizer"]]
        # the median over seeds of the runs' own steps to target
        steps = [r["target"]["reached_at_step"] for r in runs]
        if None not in steps:
            assert row["median_steps_to_target"] == statistics.median(steps)
    assert png.stat().st_size > 10_000
    # the plot says what it shows (the mean over the seeds) and draws the target
    import matplotlib.pyplot as plt
    from kfac_kernels.apps.compare import figure
    fig = figure(data["runs"], "title")
    for ax in fig.axes:
        assert "(mean over 2 seeds)" in ax.get_ylabel() or "; mean over 2 seeds)" in ax.get_ylabel()
    for ax in fig.axes[2:]:
        assert ax.get_ylabel().startswith("test accuracy")
        assert any(list(line.get_ydata()) == [0.5, 0.5] and line.get_linestyle() == "--"
                   for line in ax.get_lines())
    plt.close(fig)


@pytest.mark.parametrize("argv, message", [
    (["--compare", "adamw,lbfgs"], "--compare: unknown optimizer(s) ['lbfgs']"),
    (["--compare", "adamw", "--seeds", "a,b"], "--seeds: expected comma-separated integers"),
    (["--plot", "x.png"], "--plot and --seeds apply to --compare"),
    (["--target", "accuracy=3"], "expected METRIC=VALUE"),
])
def test_compare_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit):
        main(argv + ["--no-progress"])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("optimizer", ["muon", "bdkfac-adaptive", "singd-diagonal"])
def test_more_optimizers_train(tmp_path, optimizer):
    result = _train(tmp_path, "--optimizer", optimizer, "--steps", "20", "--eval-every", "10")
    assert math.isfinite(result["train_loss"])
    assert result["history"][-1]["train_batch_loss"] < result["history"][0]["train_batch_loss"]
    assert result["cpu_time_s"] > 0 and result["target"]["value"] == 0.97


@pytest.mark.parametrize("optimizer", ["ingd", "singd-diagonal", "kfac", "bdkfac"])
def test_no_warning_about_the_tasks_own_parameters(tmp_path, optimizer):
    """The ViT's class token and position embeddings belong to the model itself: every
    curvature optimizer is told so (skip_modules), so the run does not warn about them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(tmp_path, "--task", "digits-vit", "--optimizer", optimizer, "--steps", "2",
               "--eval-every", "2", "--log-every", "1")
    about_itself = [str(w.message) for w in caught if "no Kronecker-factored" in str(w.message)]
    assert not about_itself, about_itself


def test_soap_trains_when_installed(tmp_path):
    pytest.importorskip("pytorch_optimizer")
    result = _train(tmp_path, "--optimizer", "soap", "--steps", "20")
    assert math.isfinite(result["train_loss"])


def test_schedule_and_warmup(tmp_path):
    from kfac_kernels.apps.train import lr_multiplier
    assert [lr_multiplier(s, 10, "constant", 3) for s in range(5)] == [0.25, 0.5, 0.75, 1, 1]
    assert lr_multiplier(3, 13, "cosine", 3) == 1.0
    assert lr_multiplier(8, 13, "cosine", 3) == pytest.approx(0.5)
    assert lr_multiplier(13, 13, "cosine", 3) == pytest.approx(0.0)
    result = _train(tmp_path, "--optimizer", "kfac", "--steps", "12", "--schedule", "cosine",
                    "--warmup", "4")
    assert result["schedule"] == "cosine" and result["warmup"] == 4
    assert math.isfinite(result["train_loss"])


def test_adaptive_takes_no_learning_rate(capsys):
    with pytest.raises(SystemExit):
        main(["--optimizer", "kfac-adaptive", "--lr", "0.1", "--no-progress"])
    assert "--lr does not apply to --optimizer kfac-adaptive" in capsys.readouterr().err


def test_compare_lr_grid_keeps_the_best_point(tmp_path, capsys):
    out = tmp_path / "grid.json"
    assert main(["--compare", "sgd,kfac-adaptive", "--lr-grid", "--steps", "20",
                 "--eval-every", "5", "--target", "test_accuracy=0.3", "--no-progress",
                 "--stop-at-target", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["lr_grid"] == [1 / 3, 1.0, 3.0]
    assert [r["config"] for r in data["grid"]] == [
        f"sgd@{default_lr('digits', 'sgd') * m:.4g}" for m in (1 / 3, 1.0, 3.0)] + [
        "kfac-adaptive"]
    best = {r["optimizer"]: r for r in data["summary"]}
    inf = float("inf")
    sgd = [r for r in data["grid"] if r["optimizer"] == "sgd"]
    fewest = min(r["median_steps_to_target"] or inf for r in sgd)
    assert (best["sgd"]["median_steps_to_target"] or inf) == fewest
    assert best["kfac-adaptive"]["lr"] is None
