"""PersimmonConfig: both config.json layouts in, the Hub layout out, field-named errors for bad values."""

from __future__ import annotations

import json

import pytest

from persimmon import PersimmonConfig
from tests.conftest import TINY, build_hf_model, transformers

# adept/persimmon-8b-base's config.json as published (Hub / transformers 4.3x layout)
HUB_8B = {
    "architectures": ["PersimmonForCausalLM"], "bos_token_id": 71013, "eos_token_id": 71013,
    "hidden_act": "relu2", "hidden_dropout": 0.6, "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 16384, "layer_norm_eps": 1e-05, "max_position_embeddings": 16384,
    "model_type": "persimmon", "num_attention_heads": 64, "num_hidden_layers": 36, "qk_layernorm": True,
    "rope_scaling": None, "rope_theta": 25000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 262144, "attention_dropout": 0.0,
}


def test_reads_hub_8b_config():
    cfg = PersimmonConfig.from_dict(HUB_8B)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim) == (4096, 36, 64, 64)
    assert cfg.rotary_dim == 32 and cfg.rope_theta == 25000.0 and cfg.partial_rotary_factor == 0.5
    assert cfg.pad_token_id is None and cfg.bos_token_id == cfg.eos_token_id == 71013
    assert cfg.torch_dtype == "bfloat16" and cfg.hidden_dropout == 0.6
    assert cfg.extra == {}  # bookkeeping keys are not carried along


def test_reads_transformers5_layout(tmp_path):
    build_hf_model(tmp_path, "causal", rope_theta=12345.0, partial_rotary_factor=1.0,
                   rope_scaling={"type": "dynamic", "factor": 2.5})
    raw = json.loads((tmp_path / "config.json").read_text())
    cfg = PersimmonConfig.from_pretrained(tmp_path)
    assert cfg.rope_theta == 12345.0 and cfg.partial_rotary_factor == 1.0
    assert cfg.rope_scaling == {"type": "dynamic", "factor": 2.5}
    assert cfg.torch_dtype == (raw.get("dtype") or raw.get("torch_dtype"))
    assert cfg.hidden_size == TINY["hidden_size"]


def test_written_config_is_read_back_by_both(tmp_path):
    cfg = PersimmonConfig.from_dict({**HUB_8B, "rope_scaling": {"type": "linear", "factor": 4.0},
                                     "id2label": {"0": "neg", "1": "pos"}, "my_team_note": "v3"})
    cfg.save_pretrained(tmp_path, architecture="PersimmonForSequenceClassification")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" in raw and "rope_parameters" not in raw and raw["model_type"] == "persimmon"
    again = PersimmonConfig.from_pretrained(tmp_path)
    assert again == cfg and again.extra == {"my_team_note": "v3"}
    assert again.id2label == {0: "neg", 1: "pos"} and again.label2id == {"neg": 0, "pos": 1}
    theirs = transformers.PersimmonConfig.from_pretrained(tmp_path)
    rope = getattr(theirs, "rope_parameters", None) or {"rope_theta": theirs.rope_theta, **(theirs.rope_scaling or {})}
    assert rope["rope_theta"] == 25000.0 and rope["factor"] == 4.0
    assert theirs.num_labels == 2 and theirs.hidden_size == 4096


BAD = [
    ({"hidden_size": 100, "num_attention_heads": 64}, r"hidden_size \(100\) must be divisible by num_attention_heads \(64\)"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling.type must be one of"),
    ({"rope_scaling": {"type": "linear", "factor": 1.0}}, r"rope_scaling.factor must be a number > 1, got 1.0"),
    ({"rope_scaling": {"type": "dynamic", "factor": 0.5}}, r"rope_scaling.factor must be a number > 1, got 0.5"),
    ({"rope_scaling": {"type": "linear"}}, r"rope_scaling.factor must be a number > 1, got None"),
    ({"hidden_act": "gelu"}, "hidden_act must be 'relu2'.*'gelu'"),
    ({"partial_rotary_factor": 0.0}, r"partial_rotary_factor must be in \(0, 1\], got 0.0"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
    ({"problem_type": "ranking"}, "problem_type must be one of"),
    ({"pad_token_id": 300000}, r"pad_token_id \(300000\) is outside the vocabulary"),
    ({"torch_dtype": "int8"}, "unknown dtype 'int8'"),
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"rope_parameters": {"rope_type": "ntk", "rope_theta": 1.0, "factor": 2.0}}, "rope_scaling.type must be one of"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_configs_name_field_and_value(change, message):
    with pytest.raises(ValueError, match=message):
        PersimmonConfig.from_dict({**HUB_8B, **change})


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        PersimmonConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PersimmonConfig.from_pretrained(tmp_path)


def test_default_partial_rotary_factor_when_absent():
    raw = {k: v for k, v in HUB_8B.items() if k != "partial_rotary_factor"}
    assert PersimmonConfig.from_dict(raw).partial_rotary_factor == 0.5
