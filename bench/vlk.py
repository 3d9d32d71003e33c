"""Benchmark: uLLSAM VLK extraction, images/s, from a SAM image embedding to the VLK map.

Real size: SAM ViT-B embedding (256,64,64) -> 1024 image tokens -> a Llama-architecture LLM with InternLM2-1.8B's
dimensions (hidden 2048, 24 layers, 16 heads, 8 KV heads, MLP 8192, vocab 92553; random weights) -> VLK (256,64,64).
Compares, in the same run and on the same weights:
  ours       `ullsam_nb.mllm.VLKExtractor`: batched, SDPA attention, prompt ids built once, base model only
             (no vocabulary logits), bf16 on a GPU (also fp32, to separate the dtype from the rest);
  reference  the plain eager implementation: one image at a time, fp32, eager attention, the prompt string
             rebuilt and re-tokenised per image, image tokens scattered by a boolean mask, the full causal LM
             called with output_hidden_states=True (logits for every position).
`--quick` runs small dimensions on the CPU. Writes bench/results/vlk.json.

    python bench/vlk.py [--quick] [--batch 8] [--images 32]
"""
import argparse, copy, time, platform
from pathlib import Path
import torch
from ullsam_nb.basics import save_json, seed_everything, default_device
from ullsam_nb.mllm import VLKExtractor, embedding_to_tokens, tokens_to_embedding
from ullsam_nb.tiny_llm import train_caption_tokenizer, tiny_caption_corpus
from ullsam_nb.llm import chatml_prompt, DESCRIBE_QUESTION, INTERNVL_SYSTEM_MESSAGE, IMG_CONTEXT

FULL = dict(embed=(256, 64, 64), llm=dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
                                           intermediate_size=8192, vocab_size=92553, max_position_embeddings=4096))
QUICK = dict(embed=(64, 32, 32), llm=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                          intermediate_size=512, vocab_size=4096, max_position_embeddings=2048))


@torch.no_grad()
def reference_vlk(llm, tok, mlp1, mlp2, embedding, ratio=0.5):
    "The plain implementation, one image (1,C,h,w): rebuild and re-tokenise the prompt, scatter, full causal LM, hidden_states[-1]."
    tokens = embedding_to_tokens(embedding, ratio)
    n = tokens.shape[1]
    ids = torch.tensor([tok(chatml_prompt(DESCRIBE_QUESTION, n, INTERNVL_SYSTEM_MESSAGE))["input_ids"]], device=embedding.device)
    x = llm.get_input_embeddings()(ids)
    where = ids == tok.convert_tokens_to_ids(IMG_CONTEXT)
    x[where] = mlp1(tokens).reshape(-1, x.shape[-1]).to(x.dtype)
    h = llm(inputs_embeds=x, output_hidden_states=True).hidden_states[-1][where].reshape(1, n, -1)
    return tokens_to_embedding(mlp2(h), embedding.shape[2], embedding.shape[3], ratio)


def sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize()


def images_per_s(fn, embeddings, batch, dev, warmup=1):
    for i in range(warmup): fn(embeddings[:batch])
    sync(dev); t = time.perf_counter()
    for s in range(0, len(embeddings), batch): fn(embeddings[s:s+batch])
    sync(dev)
    return len(embeddings) / (time.perf_counter() - t)


def main(quick=False, batch=8, images=None, out_path=None):
    from transformers import LlamaConfig, LlamaForCausalLM
    dev = torch.device("cpu") if quick else default_device()
    spec = QUICK if quick else FULL
    images = images or (8 if quick else 32)
    seed_everything(0)
    tok = train_caption_tokenizer(tiny_caption_corpus(), vocab_size=1024)
    cfg = LlamaConfig(**spec["llm"], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    with torch.device(dev):
        ref_llm = LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval().requires_grad_(False)
    C, h, w = spec["embed"]
    ref = VLKExtractor(ref_llm, tok, embed_dim=C).to(dev).eval()            # its mlp1/mlp2 and LLM are the shared weights
    n_tokens = h * w // 4
    emb = torch.randn(images, C, h, w, device=dev)
    rows = []
    n_ref = max(2, images // 4) if not quick else images
    ref_ips = images_per_s(lambda e: [reference_vlk(ref_llm, tok, ref.mlp1, ref.mlp2, e[i:i+1]) for i in range(len(e))],
                           emb[:n_ref], 1, dev)
    rows.append(dict(path="reference: per image, fp32, eager attn, re-tokenised, full LM", dtype="float32", batch=1, images_per_s=ref_ips))
    with torch.no_grad(): ref_out = reference_vlk(ref_llm, tok, ref.mlp1, ref.mlp2, emb[:1])
    dtypes = [torch.float32] + ([torch.bfloat16] if dev.type == "cuda" else [])
    for dt in dtypes:
        ours_llm = copy.deepcopy(ref_llm).to(dt)
        ours_llm.set_attn_implementation("sdpa")
        ours = VLKExtractor(ours_llm, tok, embed_dim=C, mlp1=copy.deepcopy(ref.mlp1), mlp2=copy.deepcopy(ref.mlp2)).to(dev, dt).eval()
        with torch.inference_mode():
            ips = images_per_s(ours, emb.to(dt), batch, dev)
            out = ours(emb[:1].to(dt)).float()
        rel = float((out - ref_out).norm() / ref_out.norm())
        rows.append(dict(path=f"ours: batched, sdpa, prompt ids once, base model only", dtype=str(dt).split(".")[-1],
                         batch=batch, images_per_s=ips, rel_error_vs_reference=rel))
        del ours, ours_llm
        if dev.type == "cuda": torch.cuda.empty_cache()
    for r in rows:
        r["speedup_vs_reference"] = round(r["images_per_s"] / ref_ips, 2); r["images_per_s"] = round(r["images_per_s"], 3)
    print(f"VLK extraction, embedding {C}x{h}x{w} -> {n_tokens} image tokens, LLM hidden {cfg.hidden_size} x {cfg.num_hidden_layers} layers, "
          f"prompt {len(ref.prompt.ids(n_tokens)[0])} tokens, device {dev}")
    print(f"{'path':58} {'dtype':>9} {'batch':>5} {'img/s':>9} {'ratio':>6} {'rel.err':>8}")
    for r in rows:
        err = f"{r['rel_error_vs_reference']:.1e}" if "rel_error_vs_reference" in r else "-"
        print(f"{r['path']:58} {r['dtype']:>9} {r['batch']:>5} {r['images_per_s']:>9.3f} {r['speedup_vs_reference']:>5.2f}x {err:>8}")
    res = dict(benchmark="vlk", quick=quick, device=str(dev),
               device_name=torch.cuda.get_device_name() if dev.type == "cuda" else (platform.processor() or platform.machine()),
               embedding=[C, h, w], image_tokens=n_tokens, prompt_tokens=len(ref.prompt.ids(n_tokens)[0]), llm=spec["llm"],
               images_ours=images, images_reference=n_ref, torch=torch.__version__, rows=rows)
    out_path = Path(out_path) if out_path else Path(__file__).parent / "results" / "vlk.json"
    save_json(res, out_path)
    print(f"wrote {out_path}")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", "--cpu-smoke", dest="quick", action="store_true", help="small dimensions on the CPU (smoke run)")
    ap.add_argument("--batch", type=int, default=8, help="images per batch for our path")
    ap.add_argument("--images", type=int, default=None, help="images timed (default 32, quick 8)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/vlk.json)")
    a = ap.parse_args()
    main(a.quick, a.batch, a.images, a.out)
