"""Checkpoint loading and saving: dtype rules, round trips, shards, clear failures, pickles only on opt-in."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from persimmon import (
    CheckpointError,
    PersimmonConfig,
    PersimmonForCausalLM,
    PersimmonForSequenceClassification,
)
from tests.conftest import build_hf_model, transformers


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def test_dtype_rules(tmp_path):
    hf = build_hf_model(tmp_path, "causal")
    hf.to(torch.bfloat16).save_pretrained(tmp_path)  # a bf16 checkpoint, like the real ones
    assert PersimmonForCausalLM.from_pretrained(tmp_path).dtype == torch.float32  # no dtype -> float32
    assert PersimmonForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    assert PersimmonForCausalLM.from_pretrained(tmp_path, dtype="float16").dtype == torch.float16
    assert PersimmonForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        PersimmonForCausalLM.from_pretrained(tmp_path, dtype="fp8")
    # "auto" without a dtype in config.json falls back to the stored tensors' dtype
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("dtype", None), raw.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert PersimmonForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16


def test_loaded_model_is_in_eval_mode_with_dropout_config(tmp_path):
    build_hf_model(tmp_path, "causal", hidden_dropout=0.6)
    model = PersimmonForCausalLM.from_pretrained(tmp_path)
    assert not model.training
    ids = torch.randint(1, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
    assert not PersimmonForCausalLM(model.config).training  # freshly built models too


def test_round_trip_identical(tmp_path):
    build_hf_model(tmp_path / "src", "seqcls", num_labels=3, pad_token_id=0)
    model = PersimmonForSequenceClassification.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "out")
    again = PersimmonForSequenceClassification.from_pretrained(tmp_path / "out")
    assert_same_tensors(model, again)
    assert again.config == model.config
    # the saved file is the HF key layout, tensor for tensor
    assert load_file(tmp_path / "out" / "model.safetensors").keys() == load_file(tmp_path / "src" / "model.safetensors").keys()


def test_sharded_round_trip_and_transformers_reads_it(tmp_path):
    hf = build_hf_model(tmp_path / "src", "causal")
    model = PersimmonForCausalLM.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    again = PersimmonForCausalLM.from_pretrained(tmp_path / "sharded")
    assert_same_tensors(model, again)
    theirs = transformers.PersimmonForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    ids = torch.randint(1, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, hf(ids).logits, atol=1e-6, rtol=0)


def test_resave_replaces_stale_shards(tmp_path):
    build_hf_model(tmp_path / "src", "causal")
    model = PersimmonForCausalLM.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "out", max_shard_size="200KB")
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def test_missing_tensor_named_with_shape(tmp_path):
    build_hf_model(tmp_path, "causal")
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.dense_4h_to_h.bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.dense_4h_to_h\.bias \(64,\)"):
        PersimmonForCausalLM.from_pretrained(tmp_path)


def test_mismatched_tensor_named_with_both_shapes(tmp_path):
    build_hf_model(tmp_path, "causal")
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.dense.weight"] = torch.zeros(64, 32)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"self_attn\.dense\.weight: checkpoint \(64, 32\) vs model \(64, 64\)"):
        PersimmonForCausalLM.from_pretrained(tmp_path)


def test_wrong_head_gets_a_hint(tmp_path):
    build_hf_model(tmp_path, "causal")
    with pytest.raises(CheckpointError, match="causal-LM checkpoint"):
        PersimmonForSequenceClassification.from_pretrained(tmp_path)


def test_corrupt_weights_and_missing_dir(tmp_path):
    build_hf_model(tmp_path, "causal")
    (tmp_path / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        PersimmonForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        PersimmonForCausalLM.from_pretrained(tmp_path / "nope")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        PersimmonForCausalLM.from_pretrained(tmp_path)


def test_pickle_only_with_opt_in(tmp_path):
    hf = build_hf_model(tmp_path, "causal")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        PersimmonForCausalLM.from_pretrained(tmp_path)
    model = PersimmonForCausalLM.from_pretrained(tmp_path, allow_pickle=True)
    ids = torch.randint(1, 300, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_pickle_with_code_is_refused_even_with_opt_in(tmp_path):
    build_hf_model(tmp_path, "causal")
    (tmp_path / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        PersimmonForCausalLM.from_pretrained(tmp_path, allow_pickle=True)


def test_tied_embeddings(tmp_path):
    cfg = PersimmonConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, tie_word_embeddings=True)
    model = PersimmonForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    again = PersimmonForCausalLM.from_pretrained(tmp_path)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_weights_exist_once_in_memory(tmp_path):
    """Built on the meta device, weights assigned from mmap: loading a 200 MB fp32 checkpoint as bf16 grows
    anonymous memory by about the bf16 size (100 MB), not by a float32 copy on top."""
    cfg = PersimmonConfig(vocab_size=16384, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                          num_attention_heads=8)
    PersimmonForCausalLM(cfg).save_pretrained(tmp_path)
    script = textwrap.dedent(f"""
        import torch
        from persimmon import PersimmonForCausalLM
        def anon():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) * 1024
        PersimmonForCausalLM.from_pretrained({str(tmp_path)!r}, dtype="float16")  # warm up allocator and imports
        before = anon()
        m = PersimmonForCausalLM.from_pretrained({str(tmp_path)!r}, dtype="bfloat16")
        size = sum(p.numel() * p.element_size() for p in m.parameters())
        print(size, anon() - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    size, grown = map(int, out.stdout.split())
    assert grown < 1.3 * size, f"loading grew anonymous memory by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"


def test_a_checkpoint_whose_linked_base_moved_says_so(tmp_path):
    """A train-head checkpoint links its base's weight files: when the base moves, loading says what happened."""
    import json

    from persimmon.files import CheckpointError, weight_sources

    base, head = tmp_path / "base", tmp_path / "head"
    base.mkdir()
    head.mkdir()
    (base / "model-1.safetensors").write_bytes(b"x")
    (head / "model-1.safetensors").symlink_to(base / "model-1.safetensors")
    (head / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    assert weight_sources(head)[0] == [head / "model-1.safetensors"]
    base.rename(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="links to .*base/model-1.safetensors, which is gone: .*moved or removed"):
        weight_sources(head)
