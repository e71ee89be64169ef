"""HF transformers baseline of `rupantor bench decode`: prefill and decode tokens/s and peak RSS
of greedy decoding on the same model, prompts and thread count.

    python scripts/bench/hf_decode.py --model ~/.cache/rupantor/models/gemma-3-270m-q4_k_m.gguf \
        [--prompt-tokens 128] [--new-tokens 64] [--batch 1,8] [--threads N] [--repeats 1] [--json]
        [--perplexity TEXT]

--model: a .gguf file (loaded with `gguf_file=`, dequantized to f32 as transformers does) or an
HF model directory. Needs torch, transformers and gguf (the fixtures venv has them:
/root/.cache/rupantor/fixtures-venv/bin/python). Run by hand, or by
`rupantor bench decode --hf-python PYTHON`, which parses the last line of `--json`.

What is measured mirrors rupantor's GenStats: the prompts are the same synthetic ids
(row r, position i > 0: 1000 + ((i + 131 r) * 7919) % 50000, after <bos>; no padding); the
prefill is one forward over the prompts with a KV cache; decoding is new_tokens - 1 single-token
forwards through the cache with argmax (no stop token), each step's logits moved to the host as
rupantor does. Prefill tokens/s = batch * prompt_tokens / prefill time; decode tokens/s =
batch * (new_tokens - 1) / decode time. Peak RSS is VmHWM, reset through /proc/self/clear_refs
before each phase. f32 weights and activations, torch.inference_mode, SDPA attention.

--perplexity TEXT also prints HF's mean next-token NLL of the file under the same definition as
`rupantor perplexity --quant none` (the text tokenized without specials, <bos> in front, every
following token scored, one window): `perplexity: {"mean_nll", "perplexity", "tokens"}` on
stderr.
"""

import argparse
import json
import os
import sys
import time


def rss_mib():
    """(VmHWM, VmRSS) in MiB."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                k, v = line.split(":", 1)
                vals[k] = int(v.split()[0]) / 1024.0
    return vals.get("VmHWM", float("nan")), vals.get("VmRSS", float("nan"))


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def prompt_ids(bos, length, row):
    return [bos] + [1000 + ((i + 131 * row) * 7919) % 50000 for i in range(1, length)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--perplexity", metavar="TEXT")
    a = ap.parse_args()
    batches = [int(b) for b in a.batch.split(",") if b.strip()]

    import torch

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    from transformers import AutoConfig, AutoModelForCausalLM

    reset_peak()
    t0 = time.perf_counter()
    path = os.path.expanduser(a.model)
    if os.path.isfile(path):
        kw = {"gguf_file": os.path.basename(path)}
        src = os.path.dirname(os.path.abspath(path))
    else:
        kw = {}
        src = path
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, attn_implementation="sdpa", **kw
    )
    model.eval()
    load_s = time.perf_counter() - t0
    load_peak, load_rss = rss_mib()
    cfg = AutoConfig.from_pretrained(src, **kw)
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else 2
    print(
        f"HF transformers, {torch.get_num_threads()} threads: loaded {path} in {load_s:.1f}s, "
        f"peak RSS {load_peak:.0f} MiB during load, {load_rss:.0f} MiB after",
        file=sys.stderr,
    )

    def run(batch, prompt_tokens, new_tokens):
        ids = torch.tensor([prompt_ids(bos, prompt_tokens, r) for r in range(batch)])
        with torch.inference_mode():
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1, :].float().cpu().argmax(-1, keepdim=True)
            prefill_s = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1, :].float().cpu().argmax(-1, keepdim=True)
            decode_s = time.perf_counter() - t
        return prefill_s, decode_s

    if a.perplexity:
        import math

        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src, **kw)
        with open(a.perplexity, encoding="utf-8") as f:
            ids = [bos] + tok(f.read(), add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        nll = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item()
        report = {"mean_nll": nll, "perplexity": math.exp(nll), "tokens": len(ids) - 1}
        print(f"perplexity: {json.dumps(report)}", file=sys.stderr)

    run(1, min(16, a.prompt_tokens), 2)  # warm-up
    results = []
    for b in batches:
        best = None
        for _ in range(max(1, a.repeats)):
            reset_peak()
            prefill_s, decode_s = run(b, a.prompt_tokens, a.new_tokens)
            r = {
                "batch": b,
                "prefill_tok_s": b * a.prompt_tokens / prefill_s,
                "decode_tok_s": b * (a.new_tokens - 1) / decode_s,
                "peak_rss_mib": rss_mib()[0],
            }
            if best is None or r["decode_tok_s"] > best["decode_tok_s"]:
                best = r
        results.append(best)
        print(
            f"batch {b}: prefill {best['prefill_tok_s']:.1f} tok/s, decode "
            f"{best['decode_tok_s']:.1f} tok/s, peak RSS {best['peak_rss_mib']:.0f} MiB",
            file=sys.stderr,
        )
    report = {
        "threads": torch.get_num_threads(),
        "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens,
        "load_s": load_s,
        "load_peak_rss_mib": load_peak,
        "results": results,
    }
    if a.json:
        print(json.dumps(report))
    else:
        for r in results:
            print(
                f"{r['batch']:>6} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>14.1f} "
                f"{r['peak_rss_mib']:>14.0f}"
            )


if __name__ == "__main__":
    main()
