"""The training demo's checkpoints and training hygiene: --resume restores the run's settings and
continues bit for bit; checkpoints load safely and are refused when incomplete; parameter groups
and the learning-rate schedule."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

DATA = argparse.__file__  # one standard-library source file (~100 KB)


@pytest.fixture(scope="module")
def ckpt_lib():
    from lm_demo import checkpoint

    return checkpoint


@pytest.fixture(scope="module")
def training():
    from lm_demo import training

    return training


def run_flags(out: Path, *extra: str) -> list[str]:
    return [
        "--profile",
        "tiny",
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--warmup",
        "2",
        "--data",
        DATA,
        "--out",
        str(out),
        "--sample-tokens",
        "4",
        "--device",
        "cpu",
        *extra,
    ]


def fresh_checkpoint(demo, folder: Path, *flags: str) -> Path:
    """An untrained model's checkpoint at step 0 with the settings of ``flags`` (no training:
    fast)."""
    args = demo.parse_args(run_flags(folder, *flags))
    args.lr = demo.DEFAULT_LR[args.profile]  # as main resolves it
    torch.manual_seed(0)
    model = demo.build_model(args, 256)
    from lm_demo.training import lr_scheduler, param_groups

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    sched = lr_scheduler(opt, args.warmup, args.steps)
    history = {"train": [], "validation": []}
    return demo.save_run_checkpoint(folder, 0, model, opt, sched, history, args)


def test_resume_restores_settings_and_continues_bit_for_bit(
    demo, ckpt_lib, tmp_path, monkeypatch, one_thread
):
    """4 steps straight == 2 steps, a crash, and --resume with no other flag: the same losses,
    weights, optimizer and scheduler state, exactly. The run is the issue's case: SwitchHead-XL
    with softmax_n (both were lost on resume before), with gradient accumulation."""
    flags = ("--attention", "switchhead-xl", "--softmax-n", "1.0", "--grad-accum", "2")
    flags += ("--steps", "4", "--eval-every", "2")
    straight = demo.main(run_flags(tmp_path / "straight", *flags))

    real_progress = demo.progress

    def crash_at_step_3(step, *a):
        if step == 3:  # after the checkpoint of step 2 was written
            raise KeyboardInterrupt
        real_progress(step, *a)

    with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(demo, "progress", crash_at_step_3)
        demo.main(run_flags(tmp_path / "resumed", *flags))
    assert ckpt_lib.load_checkpoint(tmp_path / "resumed").step == 2

    # only --resume (and where to run): every setting comes from the checkpoint
    resumed = demo.main(["--resume", str(tmp_path / "resumed"), "--device", "cpu"])
    assert resumed["out"] == tmp_path / "resumed"  # --out defaults to the checkpoint's folder
    assert resumed["history"] == straight["history"]  # losses and validation, exactly
    assert len(resumed["history"]["train"]) == 4
    assert resumed["sample"] == straight["sample"]

    a = ckpt_lib.load_checkpoint(tmp_path / "straight")
    b = ckpt_lib.load_checkpoint(tmp_path / "resumed")
    assert a.step == b.step == 4
    assert a.settings == b.settings
    assert (b.settings["attention"], b.settings["softmax_n"]) == ("switchhead-xl", 1.0)
    assert a.model.keys() == b.model.keys()
    for name in a.model:
        assert torch.equal(a.model[name], b.model[name]), name
    opt_a, opt_b = a.state["optimizer"], b.state["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for key, state in opt_a["state"].items():
        for field, value in state.items():
            assert torch.equal(value, opt_b["state"][key][field]), (key, field)
    assert a.state["scheduler"] == b.state["scheduler"]
    model = demo.load_model(tmp_path / "resumed")
    assert type(model.transformer.layers[0].attention).__name__ == "SwitchHeadXL"


def test_checkpoint_files_load_safely(demo, ckpt_lib, tmp_path):
    """Weights in safetensors, everything else loads with torch.load(weights_only=True), and
    the manifest names both with their sizes and hashes."""
    from safetensors import safe_open

    manifest_path = fresh_checkpoint(demo, tmp_path, "--softmax-n", "1.0")
    manifest = json.loads(manifest_path.read_text())
    files = manifest["files"]
    with safe_open(str(tmp_path / files["model"]["name"]), "pt") as f:
        assert "embedding.weight" in set(f.keys())
    state = torch.load(tmp_path / files["state"]["name"], weights_only=True)
    assert state["settings"]["softmax_n"] == 1.0
    assert state["settings"]["data"] == str(Path(DATA).resolve())
    assert {"optimizer", "scheduler", "rng", "history"} <= state.keys()
    for entry in files.values():
        assert (tmp_path / entry["name"]).stat().st_size == entry["bytes"]
        assert len(entry["sha256"]) == 64


@pytest.mark.parametrize("which", ["model", "state"])
def test_truncated_or_changed_checkpoint_is_refused(demo, ckpt_lib, tmp_path, capsys, which):
    manifest = fresh_checkpoint(demo, tmp_path)
    path = tmp_path / json.loads(manifest.read_text())["files"][which]["name"]
    data = path.read_bytes()

    path.write_bytes(data[: len(data) // 2])  # cut short, as by a full disk or a crash
    with pytest.raises(ckpt_lib.CheckpointError, match="cut short"):
        ckpt_lib.load_checkpoint(tmp_path)
    with pytest.raises(SystemExit):
        demo.main(["--resume", str(tmp_path), "--device", "cpu"])
    assert "cut short" in capsys.readouterr().err

    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit changed
    with pytest.raises(ckpt_lib.CheckpointError, match="SHA-256"):
        ckpt_lib.load_checkpoint(tmp_path)

    path.unlink()
    with pytest.raises(ckpt_lib.CheckpointError, match="missing"):
        ckpt_lib.load_checkpoint(tmp_path)


def test_killed_while_writing_keeps_the_previous_checkpoint(demo, ckpt_lib, tmp_path, monkeypatch):
    """A save that dies before its manifest is in place leaves the previous checkpoint whole."""
    first = {"w": torch.arange(6.0)}
    ckpt_lib.save_checkpoint(tmp_path, 1, first, {"settings": {}})
    real_write = ckpt_lib.atomic_write

    def die_at_manifest(path, data):
        if path.name == ckpt_lib.MANIFEST:
            path.with_name(f".{path.name}.tmp-1").write_bytes(data[:10])  # a torn temp file
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(ckpt_lib, "atomic_write", die_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        ckpt_lib.save_checkpoint(tmp_path, 2, {"w": torch.zeros(6)}, {"settings": {}})
    monkeypatch.undo()
    loaded = ckpt_lib.load_checkpoint(tmp_path)
    assert loaded.step == 1 and torch.equal(loaded.model["w"], first["w"])

    # the next save completes and removes what the dead one left behind
    ckpt_lib.save_checkpoint(tmp_path, 3, {"w": torch.ones(6)}, {"settings": {}})
    assert ckpt_lib.load_checkpoint(tmp_path).step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.json",
        "model-00000003.safetensors",
        "state-00000003.pt",
    ]


def test_resume_with_a_different_flag_is_refused_naming_it(demo, tmp_path, capsys):
    fresh_checkpoint(demo, tmp_path, "--attention", "switchhead-xl", "--softmax-n", "1.0")
    with pytest.raises(SystemExit):
        demo.parse_args(["--resume", str(tmp_path), "--attention", "dense", "--lr", "0.5"])
    err = capsys.readouterr().err
    assert "--attention dense (checkpoint: switchhead-xl)" in err
    assert "--lr 0.5" in err
    assert "--softmax-n" not in err.split("error:")[-1]  # only the flags that differ

    # flags that agree (also written differently), and --out/--device/--compile, are accepted
    same_data = Path(DATA).parent / ".." / Path(DATA).parent.name / Path(DATA).name
    flags = ["--resume", str(tmp_path / "checkpoint.json"), "--softmax-n", "1", "--steps", "6"]
    flags += ["--data", str(same_data), "--out", str(tmp_path / "elsewhere")]
    args = demo.parse_args([*flags, "--device", "cpu", "--compile"])
    assert (args.attention, args.softmax_n, args.warmup) == ("switchhead-xl", 1.0, 2)
    assert args.out == str(tmp_path / "elsewhere") and args.compile
    assert args.checkpoint.step == 0


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "one"])
def test_softmax_n_refuses_non_finite_and_negative(demo, capsys, value):
    with pytest.raises(SystemExit):
        demo.parse_args([f"--softmax-n={value}"])
    assert "--softmax-n" in capsys.readouterr().err


def test_other_bad_numbers_are_refused(demo):
    for flags in (
        ["--lr", "0"],
        ["--lr", "nan"],
        ["--clip", "-1"],
        ["--grad-accum", "0"],
        ["--warmup", "-1"],
        ["--warmup", "400"],  # longer than --steps 300
        ["--weight-decay", "inf"],
        ["--eval-every", "0"],
    ):
        with pytest.raises(SystemExit):
            demo.parse_args(flags)
    assert demo.parse_args(["--softmax-n", "0"]).softmax_n == 0.0


@pytest.mark.parametrize("attention", ["switchhead", "colt5"])
def test_no_weight_decay_on_norms_embeddings_and_biases(demo, training, attention):
    model = demo.build_model(demo.parse_args(["--profile", "tiny", "--attention", attention]), 256)
    decay, no_decay = training.split_decay(model)
    modules = dict(model.named_modules())
    names = [n for n, _ in model.named_parameters()]
    assert sorted(decay + no_decay) == sorted(names)  # every parameter, once
    for name in names:
        owner = modules[name.rpartition(".")[0]]
        exempt = isinstance(owner, torch.nn.LayerNorm | torch.nn.Embedding) or name.endswith(
            ".bias"
        )
        assert (name in no_decay) == exempt, name
    assert "embedding.weight" in no_decay and "lm_head.bias" in no_decay
    assert "out_norm.weight" in no_decay and "lm_head.weight" in decay
    assert any(n.endswith("ffn.keys") for n in decay)  # the experts are decayed

    groups = training.param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert [len(g["params"]) for g in groups] == [len(decay), len(no_decay)]


def test_warmup_then_cosine_schedule(training):
    f = lambda s: training.lr_factor(s, 4, 20)
    assert [f(s) for s in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]  # linear warmup
    assert f(12) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert f(20) == pytest.approx(training.MIN_LR_FRACTION)  # the last step
    decay = [f(s) for s in range(4, 21)]
    assert all(a > b for a, b in itertools.pairwise(decay))
    assert training.lr_factor(0, 0, 20) == 1.0  # no warmup: the decay starts at the peak

    # through the optimizer: optimizer step s runs at lr * lr_factor(s)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = training.lr_scheduler(opt, 4, 20)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5 * f(s) for s in range(1, 21)], rel=1e-12)
    assert math.isclose(seen[0], 0.125)


def test_default_warmup_is_a_tenth_of_the_run(demo):
    assert demo.parse_args(["--steps", "40"]).warmup == 4
    assert demo.parse_args(["--steps", "5000"]).warmup == 100
