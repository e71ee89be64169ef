"""The PyTorch baseline of the GPU bundle (scripts/gpu-bundle.sh): HF transformers + PEFT (+
bitsandbytes) on the shapes `rupantor bench train-step|decode --device cuda --model
random:gemma2-9b` runs, with random weights, on the same GPU in the same run.

    python3 hf_gpu.py train --gradient-checkpointing on|off [--quant nf4|bf16] [--json]
    python3 hf_gpu.py decode [--batch 1,8] [--prompt-tokens 128] [--new-tokens 64] [--json]
    python3 hf_gpu.py gemv [--rows 3584] [--cols 14336] [--batch 1,8] [--json]

Each mode is one process, so each peak (`torch.cuda.max_memory_allocated`, reset once the model
is built) is that mode's own. `--json` makes the last line one JSON object, which the bundle's
report reads.

The model (`--shape`, default gemma2-9b: Gemma-2-9B-it's config) is built on the GPU and never
on the host: constructed in bf16 under `torch.device(DEVICE)`, every weight drawn there (normal,
std 0.02; norms zero, i.e. a scale of one), then with `--quant nf4` each q/k/v/o/gate/up/down
projection replaced by a bitsandbytes `Linear4bit` (NF4, blocksize 64, double-quantized absmax:
`compress_statistics=True`, bf16 compute) that quantizes the bf16 weight where it lies. The
bf16 copies are freed before anything is measured.

train: the QLoRA recipe as PEFT documents it: `prepare_model_for_kbit_training` (frozen base,
norms and embedding upcast to f32), gradient checkpointing (non-reentrant) when asked, PEFT
LoRA r 32, alpha 64, dropout 0.05 on the seven projections, `bnb.optim.PagedAdamW8bit` (lr
5e-5), forward and loss under bf16 autocast (what `TrainingArguments(bf16=True)` does). The
batch is `rupantor bench train-step`'s: `batch x seq` ids from SplitMix64, labels = ids. With
`--quant bf16` (for a host without bitsandbytes) the projections stay bf16 and the optimizer is
torch's AdamW: a LoRA baseline, not QLoRA, and labelled so in the JSON.

decode: greedy decoding of the base model (no adapter) under `torch.inference_mode`, as
`rupantor bench decode` does: the same synthetic prompts (row r, position i > 0:
1000 + ((i + 131 r) * 7919) % 50000 after <bos>), one prefill with a KV cache, then
new_tokens - 1 single-token steps, each step's next ids moved to the host. Decode tokens/s =
batch * (new_tokens - 1) / decode time.

gemv: torch's bf16 `x @ W.T` and (with bitsandbytes) `Linear4bit`'s NF4 product for a
`rows x cols` weight at each batch size, timed with CUDA events over enough weight copies that
the L2 cache holds none of them between calls: the references for `rupantor bench quant`'s
fused GEMV.
"""

import argparse
import json
import sys
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MASK = (1 << 64) - 1
DEVICE = "cuda"

SHAPES = {
    # google/gemma-2-9b-it's config.json (the fields that shape the model).
    "gemma2-9b": dict(
        vocab_size=256000,
        hidden_size=3584,
        intermediate_size=14336,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    ),
    # A two-layer model of the same family, for trying this script on a CPU (--device cpu).
    "tiny": dict(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=64,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    ),
}


class SplitMix64:
    def __init__(self, seed):
        self.state = seed & MASK

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)


def token_ids(batch, seq, vocab, bos, seed):
    """`rupantor bench train-step`'s ids (bench_train.rs `token_ids`)."""
    rng = SplitMix64(seed)
    return [[bos] + [1000 + rng.next() % (vocab - 1000) for _ in range(seq - 1)] for _ in range(batch)]


def prompt_ids(bos, length, row):
    """`rupantor bench decode`'s prompts (bench_decode.rs `prompt_ids`)."""
    return [bos] + [1000 + ((i + 131 * row) * 7919) % 50000 for i in range(1, length)]


def has_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # a broken install (no CUDA binary) raises more than ImportError
        return False
    return True


def sync():
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak():
    import torch

    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes():
    import torch

    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None


def gpu_name():
    import torch

    return torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"


def versions():
    import torch
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        v["peft"] = peft.__version__
    except ImportError:
        pass
    if has_bitsandbytes():
        import bitsandbytes

        v["bitsandbytes"] = bitsandbytes.__version__
    return v


def quantize_projections(model):
    """Every q/k/v/o/gate/up/down `nn.Linear` becomes an NF4 double-quant `Linear4bit`,
    quantized from its bf16 weight where it lies (on the GPU)."""
    import bitsandbytes as bnb
    import torch

    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name not in TARGETS or not isinstance(child, torch.nn.Linear):
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=False,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                child.weight.data,
                requires_grad=False,
                compress_statistics=True,
                quant_type="nf4",
                blocksize=64,
                module=q,
            ).to(DEVICE)
            setattr(module, name, q)
            del child
            count += 1
    return count


def build(shape, quant, seed):
    """The random model on DEVICE (see the module docs); returns (model, seconds, projections
    quantized)."""
    import torch
    import transformers

    t0 = time.perf_counter()
    cfg = transformers.Gemma2Config(**SHAPES[shape])
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = transformers.Gemma2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    n_q = quantize_projections(model) if quant == "nf4" else 0
    for p in model.parameters():
        p.requires_grad_(False)
    sync()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return model, time.perf_counter() - t0, n_q


def train(a):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model, build_s, n_q = build(a.shape, a.quant, a.seed)
    gc = a.gradient_checkpointing == "on"
    if a.quant == "nf4":
        # What from_pretrained(quantization_config=BitsAndBytesConfig(...)) marks, and what
        # PEFT reads to give the Linear4bit layers its bitsandbytes LoRA layer; newer
        # transformers derive it from the quantizer, where the plain nn.Linear LoRA layer PEFT
        # then uses computes the same.
        try:
            model.is_loaded_in_4bit = True
        except AttributeError:
            pass
        # The upcast and freezing half of the recipe; checkpointing is switched on below, as
        # for the bf16 baseline.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=a.rank,
        lora_alpha=2 * a.rank,
        lora_dropout=0.05,
        target_modules=TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    if a.quant == "nf4":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(trainable, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        stack = "HF transformers + PEFT + bitsandbytes (NF4 double quant, PagedAdamW8bit)"
    else:
        opt = torch.optim.AdamW(trainable, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        stack = "HF transformers + PEFT, bf16 base, torch AdamW (no bitsandbytes: LoRA, not QLoRA)"
    cfg = SHAPES[a.shape]
    ids = torch.tensor(token_ids(a.batch, a.seq, cfg["vocab_size"], cfg["bos_token_id"], a.seed), device=DEVICE)
    print(
        f"{stack}: {a.shape}, {n_q} projections quantized, LoRA r {a.rank} on {len(TARGETS)} "
        f"targets: {n_trainable} trainable parameters; built in {build_s:.1f} s; gradient "
        f"checkpointing {a.gradient_checkpointing}; attention "
        f"{getattr(model.config, '_attn_implementation', '?')}",
        flush=True,
    )
    reset_peak()
    losses = []
    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for step in range(a.warmup + a.steps):
        timed = step >= a.warmup
        sync()
        t = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        sync()
        t_fwd = time.perf_counter()
        loss.backward()
        sync()
        t_bwd = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t_opt = time.perf_counter()
        losses.append(loss.item())
        if timed:
            phases["forward"] += t_fwd - t
            phases["backward"] += t_bwd - t_fwd
            phases["optimizer"] += t_opt - t_bwd
        print(
            f"step {step + 1}{'' if timed else ' (warmup)'}: loss {losses[-1]:.4f}, forward+loss "
            f"{t_fwd - t:.3f} s, backward {t_bwd - t_fwd:.3f} s, optimizer {t_opt - t_bwd:.3f} s",
            flush=True,
        )
    total = sum(phases.values())
    tps = a.batch * a.seq * a.steps / total
    peak = peak_bytes()
    print(
        f"{stack}: {tps:.1f} tokens/s ({a.batch} x {a.seq}, {total / a.steps:.3f} s/step), peak "
        f"GPU memory {(peak or 0) / 2**30:.2f} GiB"
    )
    return {
        "impl": "hf",
        "mode": "train",
        "stack": stack,
        "quant": a.quant,
        "shape": a.shape,
        "gradient_checkpointing": gc,
        "batch": a.batch,
        "seq": a.seq,
        "rank": a.rank,
        "steps": a.steps,
        "tokens_per_s": tps,
        "s_per_step": total / a.steps,
        "phases_s_per_step": {k: v / a.steps for k, v in phases.items()},
        "peak_gpu_bytes": peak,
        "trainable_params": n_trainable,
        "build_s": build_s,
        "losses": losses,
    }


def decode(a):
    import torch

    model, build_s, n_q = build(a.shape, a.quant, a.seed)
    model.eval()
    bos = SHAPES[a.shape]["bos_token_id"]
    print(f"{a.shape}: {n_q} projections in NF4, built in {build_s:.1f} s", flush=True)
    results = []
    with torch.inference_mode():
        # Warm-up: kernels, cuBLAS handles and the allocator, before anything is timed.
        warm = torch.tensor([prompt_ids(bos, 16, 0)], device=DEVICE)
        out = model(input_ids=warm, use_cache=True)
        model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        del out
        for b in a.batch:
            prompts = torch.tensor([prompt_ids(bos, a.prompt_tokens, r) for r in range(b)], device=DEVICE)
            reset_peak()
            sync()
            t0 = time.perf_counter()
            out = model(input_ids=prompts, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1)
            nxt.cpu()
            t1 = time.perf_counter()
            past = out.past_key_values
            del out
            for _ in range(a.new_tokens - 1):
                out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1)
                nxt.cpu()
            t2 = time.perf_counter()
            del past, out
            r = {
                "batch": b,
                "prefill_tok_s": b * a.prompt_tokens / (t1 - t0),
                "decode_tok_s": b * (a.new_tokens - 1) / (t2 - t1),
                "peak_gpu_bytes": peak_bytes(),
            }
            print(
                f"batch {b}: prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.1f} tok/s",
                flush=True,
            )
            results.append(r)
    return {
        "impl": "hf",
        "mode": "decode",
        "quant": a.quant,
        "shape": a.shape,
        "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens,
        "build_s": build_s,
        "results": results,
    }


def time_calls(fn, copies, iters):
    """Microseconds per call (CUDA events, best of 3 rounds), cycling through `copies` inputs."""
    import torch

    for k in range(copies):
        fn(k)
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            fn(i % copies)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1000.0 / iters)
    return best


def gemv(a):
    import torch

    rows, cols = a.rows, a.cols
    l2_free = 256 << 20  # four times the largest L2 of a current GPU
    dense_bytes = rows * cols * 2
    dense_copies = max(1, -(-l2_free // dense_bytes))
    torch.manual_seed(a.seed)
    weights = [torch.randn(rows, cols, device=DEVICE, dtype=torch.bfloat16) * 0.02 for _ in range(dense_copies)]
    quantized = []
    if has_bitsandbytes():
        import bitsandbytes as bnb

        nf4_bytes = rows * cols // 2
        for k in range(max(1, -(-l2_free // nf4_bytes))):
            lin = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.bfloat16,
                                    compress_statistics=True, quant_type="nf4", device="meta")
            lin.weight = bnb.nn.Params4bit(weights[k % dense_copies].clone(), requires_grad=False,
                                           compress_statistics=True, quant_type="nf4", blocksize=64,
                                           module=lin).to(DEVICE)
            quantized.append(lin)
    results = []
    with torch.inference_mode():
        for b in a.batch:
            x = torch.randn(b, cols, device=DEVICE, dtype=torch.bfloat16)
            r = {"batch": b, "bf16_us": time_calls(lambda k: x @ weights[k].t(), dense_copies, a.iters)}
            r["bf16_weight_gb_per_s"] = dense_bytes / (r["bf16_us"] * 1e-6) / 1e9
            if quantized:
                r["bnb_nf4_us"] = time_calls(lambda k: quantized[k](x), len(quantized), a.iters)
            print(json.dumps(r), flush=True)
            results.append(r)
    return {"impl": "hf", "mode": "gemv", "rows": rows, "cols": cols, "results": results}


def main():
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["train", "decode", "gemv"])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gemma2-9b")
    ap.add_argument("--quant", choices=["nf4", "bf16"], default=None,
                    help="projections in NF4 (default where bitsandbytes imports) or bf16")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the script")
    ap.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on")
    ap.add_argument("--batch", default=None, help="train: sequences per step [2]; decode/gemv: sizes [1,8]")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed train steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed train steps first")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, default=3584)
    ap.add_argument("--cols", type=int, default=14336)
    ap.add_argument("--iters", type=int, default=200, help="gemv calls per timed round")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    DEVICE = a.device
    if a.quant is None:
        a.quant = "nf4" if has_bitsandbytes() else "bf16"
    if a.quant == "nf4" and not has_bitsandbytes():
        sys.exit("hf_gpu.py: --quant nf4 needs bitsandbytes, which does not import here")
    if a.mode == "train":
        a.batch = int(a.batch or 2)
        report = train(a)
    else:
        a.batch = [int(b) for b in (a.batch or "1,8").split(",")]
        if a.mode == "gemv" and DEVICE != "cuda":
            sys.exit("hf_gpu.py gemv: CUDA events need --device cuda")
        report = decode(a) if a.mode == "decode" else gemv(a)
    report["gpu"] = gpu_name()
    report["versions"] = versions()
    if a.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
