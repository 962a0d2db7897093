"""moeut.convert: the authors' training-code checkpoints into MoEUTLM.

The fixture (``fixtures/training_code``, see its README) is a tiny checkpoint written by the
authors' training code with the logits their model computes: the converted model must
reproduce them.
"""

from __future__ import annotations

import copy
import fractions
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moeut import MoEUTLM
from moeut.convert import (
    convert_state_dict,
    convert_training_checkpoint,
    load_training_checkpoint,
    main,
    read_converted,
    to_moeut_lm,
    training_args_to_config,
)

FIXTURE = Path(__file__).parent / "fixtures" / "training_code"
CHECKPOINT = FIXTURE / "checkpoint.pth"

EXPECTED_CONFIG = dict(
    n_tokens=50,
    d_model=24,
    n_layers=4,
    n_heads=2,
    ff_n_experts=6,
    att_n_experts=3,
    d_head=6,
    group_size=2,
    ff_k=2,
    att_k=2,
    ff_expert_dropout=0.0,
    att_expert_dropout=0.0,
    ff_expert_size=8,
    dropout=0.0,
    entropy_reg=0.01,
    att_entropy_reg=0.001,
)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE / "logits.pt", weights_only=True)


@pytest.fixture
def checkpoint() -> dict:
    return load_training_checkpoint(CHECKPOINT)


def logits_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).outputs


def assert_reproduces(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(
        logits_of(model, reference["tokens"]), reference["logits"], atol=2e-5, rtol=1e-4
    )


# ----- against the training code's own logits -----


@pytest.mark.parametrize("expert_impl", ["dense", "cvmm"])
def test_reproduces_training_code_logits(reference, expert_impl):
    state, config = convert_training_checkpoint(CHECKPOINT)
    assert config == EXPECTED_CONFIG
    model = to_moeut_lm(state, config)
    for module in model.modules():
        if hasattr(module, "expert_impl"):
            module.expert_impl = expert_impl
    assert_reproduces(model, reference)


def test_a_wrong_mapping_would_show(reference, checkpoint):
    """The fixture's norms differ enough that swapping two of them breaks the logits."""
    model_state = dict(checkpoint["model"])
    a, b = "unique_layers.0.self_attn.norm.weight", "unique_layers.0.pkm.norm.weight"
    model_state[a], model_state[b] = model_state[b], model_state[a]
    state, config = convert_training_checkpoint({**checkpoint, "model": model_state})
    got = logits_of(to_moeut_lm(state, config), reference["tokens"])
    assert (got - reference["logits"]).abs().max() > 1e-3


def test_mapping_has_no_transposes(checkpoint):
    state, _ = convert_training_checkpoint(checkpoint)
    theirs = checkpoint["model"]
    pairs = {
        "unique_layers.1.self_attn.projections.v": "transformer.layers.1.attention.v",
        "unique_layers.1.self_attn.projections.o": "transformer.layers.1.attention.o",
        "unique_layers.1.self_attn.projections.q": "transformer.layers.1.attention.q.weight",
        "unique_layers.1.self_attn.selections.v": "transformer.layers.1.attention.sel_v",
        "unique_layers.1.pkm.keys": "transformer.layers.1.ffn.keys",
        "unique_layers.1.pkm.values": "transformer.layers.1.ffn.values",
        "output.bias": "lm_head.bias",
    }
    for src, dst in pairs.items():
        assert torch.equal(state[dst], theirs[src]), (src, dst)
    assert not any("iter" in k or "kv_sel_counts" in k for k in state)


# ----- loading -----


def test_loads_with_weights_only(checkpoint):
    assert set(checkpoint) >= {"model", "run_invariants", "state"}
    assert type(checkpoint["state"]) is dict  # their DotDict, read as a plain dict
    with pytest.raises(Exception, match="DotDict"):  # what the stand-in is for
        torch.load(CHECKPOINT, weights_only=True)


def test_pickled_objects_need_trust(tmp_path, checkpoint):
    path = tmp_path / "with_object.pth"
    torch.save({**checkpoint, "extra": fractions.Fraction(1, 3)}, path)
    with pytest.raises(ValueError, match="trust_pickle"):
        load_training_checkpoint(path)
    loaded = load_training_checkpoint(path, trust_pickle=True)
    assert loaded["extra"] == fractions.Fraction(1, 3)
    _, config = convert_training_checkpoint(path, trust_pickle=True)
    assert config == EXPECTED_CONFIG


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="not a checkpoint dict"):
        load_training_checkpoint(path)
    with pytest.raises(ValueError, match="not a training-code checkpoint"):
        convert_training_checkpoint({"weights": torch.zeros(3)})


# ----- CLI and output formats -----


@pytest.mark.parametrize("name", ["out.pt", "out.safetensors"])
def test_cli_round_trip(tmp_path, reference, capsys, name):
    if name.endswith(".safetensors"):
        pytest.importorskip("safetensors")
    dst = tmp_path / name
    assert main([str(CHECKPOINT), str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out
    state, config = read_converted(dst)
    assert config == EXPECTED_CONFIG
    assert_reproduces(to_moeut_lm(state, config), reference)


def test_cli_hugging_face_folder(tmp_path, reference):
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from moeut.hf import MoEUTForCausalLM

    dst = tmp_path / "hf"
    assert main([str(CHECKPOINT), str(dst)]) == 0
    model = MoEUTForCausalLM.from_pretrained(dst).eval()
    assert model.config.vocab_size == 50 and model.config.group_size == 2
    with torch.no_grad():
        logits = model(reference["tokens"]).logits
    torch.testing.assert_close(logits, reference["logits"], atol=2e-5, rtol=1e-4)


def test_python_dash_m(tmp_path):
    dst = tmp_path / "out.pt"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, "-m", "moeut.convert", str(CHECKPOINT), str(dst)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"wrote {dst} (torch)")
    bad = subprocess.run(
        [sys.executable, "-m", "moeut.convert", str(CHECKPOINT), str(dst), "--arg", "moe.bias=1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 1 and "moe.bias" in bad.stderr


def test_cli_args_and_dtype(tmp_path):
    dst = tmp_path / "out.pt"
    assert main([str(CHECKPOINT), str(dst), "--arg", "moe.att.k=1", "--dtype", "bfloat16"]) == 0
    state, config = read_converted(dst)
    assert config["att_k"] == 1
    assert all(t.dtype == torch.bfloat16 for t in state.values())


def test_cli_reports_errors(tmp_path, capsys):
    assert main([str(CHECKPOINT), str(tmp_path / "x.pt"), "--arg", "moe.nonorm=0"]) == 1
    assert "moe.nonorm" in capsys.readouterr().err


def test_read_converted_refuses_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"not a moeut\.convert output"):
        read_converted(path)


# ----- clear errors -----


def with_model_state(checkpoint: dict, edit) -> dict:
    out = copy.copy(checkpoint)
    out["model"] = dict(checkpoint["model"])
    edit(out["model"])
    return out


def test_unknown_key(checkpoint):
    bad = with_model_state(
        checkpoint, lambda s: s.__setitem__("unique_layers.0.pkm.bias", torch.zeros(6, 8))
    )
    with pytest.raises(ValueError, match=r"unknown key.*unique_layers\.0\.pkm\.bias"):
        convert_training_checkpoint(bad)


def test_third_unique_layer_is_unknown(checkpoint):
    def add_layer(s):
        for k in list(s):
            if k.startswith("unique_layers.1."):
                s[k.replace("unique_layers.1.", "unique_layers.2.")] = s[k]

    with pytest.raises(ValueError, match=r"unknown key.*unique_layers\.2\."):
        convert_training_checkpoint(with_model_state(checkpoint, add_layer))


def test_missing_key(checkpoint):
    bad = with_model_state(checkpoint, lambda s: s.pop("unique_layers.1.self_attn.selections.v"))
    with pytest.raises(
        ValueError, match=r"missing key.*unique_layers\.1\.self_attn\.selections\.v"
    ):
        convert_training_checkpoint(bad)


def test_shape_mismatch(checkpoint):
    def shrink(s):
        s["unique_layers.0.pkm.keys"] = s["unique_layers.0.pkm.keys"][:, :, :4]

    with pytest.raises(
        ValueError, match=r"unique_layers\.0\.pkm\.keys.*\(6, 24, 8\).*\(6, 24, 4\)"
    ):
        convert_training_checkpoint(with_model_state(checkpoint, shrink))


def test_shape_mismatch_from_arguments(checkpoint):
    """Arguments that disagree with the tensors name the first tensor that does not fit."""
    with pytest.raises(ValueError, match=r"projections\.q.*expected shape \(18, 24\)"):
        convert_training_checkpoint(checkpoint, training_args={"transformer.n_heads": 3})


def test_integer_tensor_refused(checkpoint):
    bad = with_model_state(
        checkpoint, lambda s: s.__setitem__("output.bias", torch.zeros(50, dtype=torch.int64))
    )
    with pytest.raises(ValueError, match=r"'output\.bias'.*floating-point"):
        convert_training_checkpoint(bad)


@pytest.mark.parametrize(
    "name, value",
    [
        ("transformer.variant", "preln_rope_universal"),
        ("moe.att.enable", 0),
        ("moe.nonorm", 0),
        ("moe.att.k_expert", 1),
        ("moe.att.same_sel", 1),
        ("moe.att.selection_mode", "softmax"),
        ("moe.selection_mode", "gate"),
        ("transformer.activation", "gelu"),
        ("transformer.universal.group_type", "aabb"),
        ("rope.rotate_fraction", 0.25),
        ("rope.base", 500000.0),
        ("embedding_size", "64"),
        ("lm.trafo.norm_input", 1),
        ("moe.att.v_size", "12"),
        ("moe.att.n_experts", 1),
    ],
)
def test_unsupported_configuration(checkpoint, name, value):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        convert_training_checkpoint(checkpoint, training_args={name: value})


def test_bad_argument_value(checkpoint):
    with pytest.raises(ValueError, match=r"pkm\.n_heads.*expected int"):
        convert_training_checkpoint(checkpoint, training_args={"pkm.n_heads": "twelve"})
    with pytest.raises(ValueError, match=r"moe\.nonorm.*boolean"):
        convert_training_checkpoint(checkpoint, training_args={"moe.nonorm": "maybe"})


def test_layers_not_a_multiple_of_group(checkpoint):
    with pytest.raises(ValueError, match="not a multiple"):
        convert_training_checkpoint(checkpoint, training_args={"transformer.encoder_n_layers": 5})


# ----- argument handling -----


def test_bare_state_dict_needs_arguments(checkpoint, reference):
    bare = checkpoint["model"]
    with pytest.raises(ValueError, match=r"transformer\.encoder_n_layers"):
        convert_training_checkpoint(bare)
    with pytest.raises(ValueError, match=r"pkm\.n_heads"):
        convert_training_checkpoint(bare, training_args={"transformer.encoder_n_layers": 4})
    # The sizes come from the tensors; the options default to the training code's defaults,
    # so the MoEUT ones must be given.
    args = {
        "transformer.encoder_n_layers": 4,
        "pkm.n_heads": 2,
        "moe.att.k": 2,
        "transformer.variant": "preln_moe_universal",
        "moe.att.enable": 1,
        "moe.nonorm": 1,
        "moe.att.q_expert": 0,
        "moe.att.k_expert": 0,
    }
    state, config = convert_training_checkpoint(bare, training_args=args)
    assert {k: config[k] for k in ("d_model", "n_heads", "d_head", "group_size")} == {
        "d_model": 24,
        "n_heads": 2,
        "d_head": 6,
        "group_size": 2,
    }
    assert_reproduces(to_moeut_lm(state, config), reference)


def test_argument_values_as_the_training_code_stores_them(checkpoint):
    args = checkpoint["run_invariants"]["args"]
    assert args["transformer.head_projection_size"] == "6"  # "none"-able ints are strings
    assert args["moe.att.perplexity_reg"] == "0.001"
    assert args["moe.nonorm"] == 1  # booleans are 0/1
    config = training_args_to_config(args, checkpoint["model"])
    assert config == EXPECTED_CONFIG
    no_head_size = {**args, "transformer.head_projection_size": "none"}
    assert training_args_to_config(no_head_size, checkpoint["model"])["d_head"] == 24 // 2


def test_non_universal_variant(checkpoint):
    """preln_moe has no sharing: every layer is distinct (group_size = n_layers)."""
    _, config = convert_training_checkpoint(
        checkpoint,
        training_args={"transformer.variant": "preln_moe", "transformer.encoder_n_layers": 2},
    )
    assert config["n_layers"] == config["group_size"] == 2


def test_aabb_with_one_repeat_is_abab(checkpoint):
    _, config = convert_training_checkpoint(
        checkpoint,
        training_args={
            "transformer.universal.group_type": "aabb",
            "transformer.encoder_n_layers": 2,
        },
    )
    assert config["n_layers"] == config["group_size"] == 2


def test_embedding_scale_is_folded(checkpoint):
    state, _ = convert_training_checkpoint(
        checkpoint, training_args={"transformer.embedding_scale": "2.5"}
    )
    torch.testing.assert_close(
        state["embedding.weight"], 2.5 * checkpoint["model"]["embedding.weight"]
    )


def test_expert_dropout_and_regularisers(checkpoint):
    _, config = convert_training_checkpoint(
        checkpoint,
        training_args={
            "moe.drop_expert": 0.1,
            "moe.att.drop_expert": "none",
            "moe.att.perplexity_reg": "none",
        },
    )
    assert config["ff_expert_dropout"] == config["att_expert_dropout"] == 0.1
    assert config["att_entropy_reg"] == config["entropy_reg"] == 0.01


def test_convert_state_dict_directly(checkpoint):
    state = convert_state_dict(checkpoint["model"], EXPECTED_CONFIG)
    model = MoEUTLM(**EXPECTED_CONFIG)
    model.load_state_dict(state, strict=True)
