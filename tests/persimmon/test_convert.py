"""Adept release -> HF layout: a synthetic Megatron-layout checkpoint with the real key names converts and loads."""

from __future__ import annotations

import argparse
import enum
import sys
import types

import pytest
import shutil

import sentencepiece as spm
import torch

from persimmon import PersimmonForCausalLM
from persimmon.convert import ConversionError, convert_release
from tests.conftest import build_hf_model

# Megatron's names for the HF keys of one layer (the inverse of the documented renames)
LAYER_KEYS = [
    "self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
    "self_attention.dense.weight", "self_attention.dense.bias",
    "self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
    "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
    "input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight", "post_attention_layernorm.bias",
]


def megatron_state(hf_state: dict[str, torch.Tensor], layers: int) -> dict:
    """Nest the HF tensors the way model_optim_rng.pt["model"] holds them."""
    encoder = {}
    for i in range(layers):
        for key in LAYER_KEYS:
            hf_key = f"model.layers.{i}." + key.replace("self_attention", "self_attn")
            encoder[f"layers.{i}.{key}"] = hf_state[hf_key]
        encoder[f"layers.{i}.self_attention.rotary_emb.inv_freq"] = torch.ones(4)  # dropped by the conversion
    encoder["final_layernorm.weight"] = hf_state["model.final_layernorm.weight"]
    encoder["final_layernorm.bias"] = hf_state["model.final_layernorm.bias"]
    return {
        "language_model": {
            "embedding": {"word_embeddings": {"weight": hf_state["model.embed_tokens.weight"]}},
            "encoder": encoder,
        },
        "word_embeddings_for_head": {"weight": hf_state["lm_head.weight"]},
    }


@pytest.fixture
def release(tmp_path, monkeypatch, sentencepiece_model):
    """A release directory like the Adept tar's, with Megatron-only objects inside the pickle."""
    hf = build_hf_model(tmp_path / "hf", "causal", rope_theta=25000.0, max_position_embeddings=48)
    root = tmp_path / "8b_base_model_release"
    ckpt_dir = root / "iter_0001000" / "mp_rank_00"
    ckpt_dir.mkdir(parents=True)
    fake = types.ModuleType("megatron_enums")

    class AttnMaskType(enum.Enum):
        causal = 2

    AttnMaskType.__module__, AttnMaskType.__qualname__ = "megatron_enums", "AttnMaskType"
    fake.AttnMaskType = AttnMaskType
    monkeypatch.setitem(sys.modules, "megatron_enums", fake)
    args = argparse.Namespace(num_attention_heads=4, max_position_embeddings=48, seq_length=48,
                              rotary_emb_base=25000, attn_mask_type=AttnMaskType.causal)
    torch.save({"model": megatron_state(hf.state_dict(), 2), "args": args, "iteration": 1000,
                "checkpoint_version": 3.0}, ckpt_dir / "model_optim_rng.pt")
    # an older iteration that must not be picked
    (root / "iter_0000500" / "mp_rank_00").mkdir(parents=True)
    torch.save({"model": {}}, root / "iter_0000500" / "mp_rank_00" / "model_optim_rng.pt")
    shutil.copyfile(sentencepiece_model, root / "adept_vocab.model")
    monkeypatch.delitem(sys.modules, "megatron_enums")  # conversion must not need Megatron's code
    return hf, root


def test_release_converts_and_loads_strictly(release, tmp_path):
    hf, root = release
    out = convert_release(root, tmp_path / "converted", dtype="float32")
    model = PersimmonForCausalLM.from_pretrained(out)  # strict key and shape checks
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_hidden_layers, cfg.max_position_embeddings) == (4, 2, 48)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert cfg.bos_token_id == cfg.eos_token_id == sp.piece_to_id("|ENDOFTEXT|")
    ids = torch.randint(1, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_release_default_dtype_is_bf16(release, tmp_path):
    _, root = release
    out = convert_release(root, tmp_path / "converted")
    assert PersimmonForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16


def test_missing_release_checkpoint(tmp_path):
    with pytest.raises(ConversionError, match="no iter_"):
        convert_release(tmp_path, tmp_path / "out")


def test_release_with_wrong_keys(tmp_path):
    path = tmp_path / "iter_0000001" / "mp_rank_00"
    path.mkdir(parents=True)
    torch.save({"model": {"something": {"else": torch.zeros(2)}}}, path / "model_optim_rng.pt")
    with pytest.raises(ConversionError, match="lacks model.embed_tokens.weight"):
        convert_release(tmp_path, tmp_path / "out")
