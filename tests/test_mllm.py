"Integration tests of the VLK path: real transformers classes saved and reloaded, determinism, the on-disk VLK cache across processes."
import os, sys, json, subprocess, textwrap
from pathlib import Path
import numpy as np
import pytest
import torch

from ullsam_nb.basics import hash_file, seed_everything
from ullsam_nb import mllm, llm as llm_mod, tiny_llm
from ullsam_nb.basics import InputError
from ullsam_nb.mllm import (pixel_shuffle, inverse_pixel_shuffle, embedding_to_tokens, tokens_to_embedding, VLKExtractor,
                            build_tiny_mllm, cached_vlk, vlk_cache_dir)
from ullsam_nb.llm import load_llm, last_hidden_states, CHATML_TOKENS, IMAGE_TOKENS, IMG_CONTEXT
from ullsam_nb.tiny_llm import train_caption_tokenizer, build_tiny_llm, load_tiny_llm


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ULLSAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ULLSAM_QUIET", "1")


@pytest.mark.parametrize("shape,ratio", [((2, 64, 64, 256), 0.5), ((1, 8, 12, 3), 0.5), ((3, 9, 6, 2), 1/3), ((1, 4, 4, 5), 1.0)])
def test_shuffle_inverse_exact(shape, ratio):
    x = torch.randn(*shape)
    assert torch.equal(inverse_pixel_shuffle(pixel_shuffle(x, ratio), ratio), x)
    y = torch.randn(*pixel_shuffle(x, ratio).shape)
    assert torch.equal(pixel_shuffle(inverse_pixel_shuffle(y, ratio), ratio), y)


def test_tokens_roundtrip_real_size():
    e = torch.randn(1, 256, 64, 64)
    t = embedding_to_tokens(e)
    assert t.shape == (1, 1024, 1024)
    assert torch.equal(tokens_to_embedding(t, 64, 64), e)


def _tokenizer_without_image_tokens():
    tok = train_caption_tokenizer(["Describe the image in detail", "nuclei cells background"] * 10, vocab_size=300,
                                  special_tokens=CHATML_TOKENS)
    assert not any(t in tok.get_vocab() for t in IMAGE_TOKENS)
    return tok


def _save(cls_name, folder):
    import transformers
    cls, cfg_cls = getattr(transformers, cls_name + "ForCausalLM"), getattr(transformers, cls_name + "Config")
    tok = _tokenizer_without_image_tokens()
    cfg = cfg_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    cls(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", ["Llama", "Qwen2"])
def test_reload_adds_tokens_resizes_and_never_touches_disk(arch, tmp_path):
    d = _save(arch, tmp_path / arch)
    before = {f.name: hash_file(f) for f in d.iterdir()}
    n_vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    llm, tok = load_llm(d)
    assert all(t in tok.get_vocab() for t in IMAGE_TOKENS)
    assert llm.get_input_embeddings().weight.shape[0] == len(tok) == n_vocab + 3
    ext = VLKExtractor(llm, tok, embed_dim=64)
    with torch.no_grad(): v = ext(torch.randn(2, 64, 16, 16))
    assert v.shape == (2, 64, 16, 16) and torch.isfinite(v).all()
    assert {f.name: hash_file(f) for f in d.iterdir()} == before
    # loading twice gives the same resized embeddings (deterministic new rows) hence the same VLK
    llm2, tok2 = load_llm(d)
    assert torch.equal(llm.get_input_embeddings().weight, llm2.get_input_embeddings().weight)


def test_bf16_llm_with_fp32_mlps():
    llm, tok = load_tiny_llm(dtype=torch.bfloat16)
    ext = VLKExtractor(llm, tok, embed_dim=64)
    with torch.no_grad(): v = ext(torch.randn(1, 64, 16, 16))
    assert v.dtype == torch.float32 and v.shape == (1, 64, 16, 16)


def test_hidden_states_fallback_without_base_model():
    llm, tok = load_tiny_llm()
    x = torch.randn(1, 5, llm.config.hidden_size)
    direct = last_hidden_states(llm, x)

    class NoBase(torch.nn.Module):          # a model whose base_model is itself: the output_hidden_states path
        def __init__(self, m): super().__init__(); self.m = m
        def forward(self, **kw): return self.m(**kw)
    torch.testing.assert_close(last_hidden_states(NoBase(llm), x), direct)


def test_tiny_llm_deterministic_across_cache_roots(tmp_path, monkeypatch):
    monkeypatch.setenv("ULLSAM_CACHE_DIR", str(tmp_path / "a"))
    a = build_tiny_llm(seed=3)
    monkeypatch.setenv("ULLSAM_CACHE_DIR", str(tmp_path / "b"))
    b = build_tiny_llm(seed=3)
    assert a != b and a.name == b.name
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.iterdir(): assert hash_file(f) == hash_file(b / f.name), f.name
    assert not [p for p in a.parent.iterdir() if p.name.startswith(".")]     # no temp folders left


def test_mllm_generates_from_numpy_images():
    m = build_tiny_mllm().eval()
    imgs = [np.random.default_rng(0).integers(0, 255, (100, 140), dtype=np.uint8),
            np.random.default_rng(1).random((64, 64, 3)).astype(np.float32)]
    out = m.generate(imgs, max_new_tokens=5)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


_RUN = textwrap.dedent("""
    import sys, json, torch
    from ullsam_nb.basics import seed_everything
    from ullsam_nb.tiny_llm import load_tiny_llm
    from ullsam_nb.mllm import VLKExtractor, cached_vlk
    llm, tok = load_tiny_llm()
    seed_everything(0)
    ext = VLKExtractor(llm, tok, embed_dim=64)
    calls = []
    fwd = ext.forward
    ext.forward = lambda e: (calls.append(len(e)), fwd(e))[1]
    g = torch.Generator().manual_seed(5)
    v = cached_vlk(ext, torch.randn(3, 64, 16, 16, generator=g))
    print(json.dumps({"calls": calls, "sum": float(v.double().sum())}))
""")


def test_vlk_cache_reused_across_processes(tmp_path):
    env = dict(os.environ, ULLSAM_CACHE_DIR=str(tmp_path / "shared_cache"), ULLSAM_QUIET="1")
    run = lambda: json.loads(subprocess.run([sys.executable, "-c", _RUN], env=env, capture_output=True, text=True,
                                            check=True).stdout.strip().splitlines()[-1])
    first, second = run(), run()
    assert first["calls"] == [3] and second["calls"] == []
    assert first["sum"] == second["sum"]
    files = list((tmp_path / "shared_cache" / "vlk").rglob("*.safetensors"))
    assert len(files) == 3 and not list((tmp_path / "shared_cache" / "vlk").rglob(".*"))


# --- InternVL checkpoints as users download them: only the language model and tokenizer are used --------------------

def _internlm2_reference(sd, c, x):
    "An independent InternLM2 forward (its own weight names, packed wqkv read as (kv head, [g queries, key, value], dim)) -> final-norm hidden states."
    H, nh, nkv, eps = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    d, g = H // nh, nh // nkv
    B, L, _ = x.shape
    rms = lambda h, w: w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))
    inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.outer(torch.arange(L, dtype=torch.float64), inv)
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
    rot = lambda t: torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1)
    rope = lambda t: t * cos + rot(t) * sin
    h = x
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(h, sd[p + "attention_norm.weight"])
        qkv = (a @ sd[p + "attention.wqkv.weight"].T).reshape(B, L, nkv, g + 2, d)
        q = qkv[..., :g, :].reshape(B, L, nh, d).transpose(1, 2)
        k = qkv[..., g, :].transpose(1, 2).repeat_interleave(g, 1)
        v = qkv[..., g + 1, :].transpose(1, 2).repeat_interleave(g, 1)
        q, k = rope(q), rope(k)
        att = (q @ k.transpose(-1, -2)) / d ** 0.5 + torch.full((L, L), float("-inf")).triu(1)
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, L, H)
        h = h + o @ sd[p + "attention.wo.weight"].T
        m = rms(h, sd[p + "ffn_norm.weight"])
        h = h + (torch.nn.functional.silu(m @ sd[p + "feed_forward.w1.weight"].T) * (m @ sd[p + "feed_forward.w3.weight"].T)) @ sd[p + "feed_forward.w2.weight"].T
    return rms(h, sd["model.norm.weight"])


def test_internvl_chat_checkpoint_gives_its_language_model(tmp_path):
    "InternVL2.5's layout (InternLM2 names, packed wqkv, bf16, remote-code tokenizer) -> a native LlamaForCausalLM computing what InternLM2 computes."
    d = tiny_llm.save_tiny_internvl(tmp_path / "InternVL2_5-2B")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "internvl_chat" and cfg["llm_config"]["model_type"] == "internlm2"
    assert llm_mod.llm_checkpoint_layout(d) == "internvl_chat"
    before = {f: hash_file(d / f) for f in os.listdir(d)}
    with pytest.raises(InputError, match="trust_remote_code=True"): load_llm(d)
    llm, tok = load_llm(d, trust_remote_code=True, dtype=torch.float32)
    assert type(llm).__name__ == "LlamaForCausalLM" and type(tok).__name__ == "InternLM2Tokenizer"
    assert llm.config.rope_parameters["rope_type"] == "dynamic" and llm.config.rope_parameters["rope_theta"] == 1e6
    sd = {k[len("language_model."):]: v.float() for k, v in llm_mod.read_safetensors(d, lambda k: k.startswith("language_model.")).items()}
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        torch.testing.assert_close(last_hidden_states(llm, x), _internlm2_reference(sd, cfg["llm_config"], x), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(llm.get_output_embeddings().weight[:len(sd["output.weight"])], sd["output.weight"])
    assert all(t in tok.get_vocab() for t in IMAGE_TOKENS)
    ext = VLKExtractor(llm, tok, embed_dim=64)
    with torch.no_grad(): assert ext(torch.randn(1, 64, 16, 16)).shape == (1, 64, 16, 16)
    assert {f: hash_file(d / f) for f in os.listdir(d)} == before          # the download is never rewritten


def test_internvl_hf_checkpoint_gives_its_language_model(tmp_path):
    "transformers' native InternVL format: the text model's own class, weights from the saved checkpoint, tied head."
    from transformers import InternVLForConditionalGeneration
    d = tiny_llm.save_tiny_internvl(tmp_path / "internvl_hf", "internvl_hf")
    assert llm_mod.llm_checkpoint_layout(d) == "internvl_hf"
    llm, tok = load_llm(d)
    full = InternVLForConditionalGeneration.from_pretrained(d)
    assert type(llm).__name__ == "Qwen2ForCausalLM"
    n = full.get_input_embeddings().weight.shape[0]
    torch.testing.assert_close(llm.get_input_embeddings().weight[:n], full.get_input_embeddings().weight)
    x = torch.randn(1, 5, llm.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(last_hidden_states(llm, x), full.model.language_model(inputs_embeds=x).last_hidden_state, atol=1e-5, rtol=1e-4)


def test_plain_causal_lm_still_loads(tmp_path):
    "A plain causal LM folder is not mistaken for InternVL."
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = _tokenizer_without_image_tokens()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1)).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    assert llm_mod.llm_checkpoint_layout(tmp_path / "llama") == "causal_lm"
    llm, _ = load_llm(tmp_path / "llama")
    assert type(llm).__name__ == "LlamaForCausalLM"
    with pytest.raises(InputError, match="no config.json"): llm_mod.llm_checkpoint_layout(tmp_path)
