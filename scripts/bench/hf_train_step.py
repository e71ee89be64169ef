"""The PyTorch baseline of `rupantor bench train-step`: QLoRA train steps of HF transformers +
PEFT + bitsandbytes on the CPU, on the same model and shapes.

Run by hand (CI never runs it):

    scripts/get-model.sh
    ~/.cache/rupantor/fixtures-venv/bin/python scripts/bench/hf_train_step.py \
        [--model ~/.cache/rupantor/models/gemma-3-270m-q4_k_m.gguf] \
        [--batch 2] [--seq 256] [--rank 32] [--steps 3] [--warmup 1] [--json]

Made for torch 2.15 / transformers 5.23 / peft 0.21.2 / bitsandbytes 0.50.2 (CPU).

What one step is, as `rupantor bench train-step` does it:

* the model: the GGUF loaded by transformers (`gguf_file=`, every tensor dequantized to f32),
  then each of the seven projection types (q, k, v, o, gate, up, down) of every layer replaced
  by a bitsandbytes `Linear4bit` holding the weight in NF4 with double quantization (blocksize
  64, the absmax 8-bit quantized in blocks of 256: `compress_statistics=True`), computing in
  f32. `BitsAndBytesConfig(load_in_4bit=...)` is not combined with `gguf_file=` by transformers,
  so the replacement is done here, the way `replace_with_bnb_linear` does it. Embeddings (the
  tied lm_head) and norms stay f32 and frozen, as in rupantor.
* LoRA (PEFT): r 32, alpha 64, dropout 0.05 on all seven projections, no bias.
* the batch: `batch x seq` token ids from SplitMix64 (the same ids rupantor's bench uses:
  `1000 + next() % (vocab - 1000)` row by row, `<bos>` first), labels = ids (every position
  trained); HF computes the loss over the full `[batch, seq, vocab]` logits.
* forward + loss + backward + `bnb.optim.AdamW8bit` step (lr 5e-5, weight decay 0, 8-bit state
  for tensors of at least 4096 elements, bnb's default), default attention implementation,
  torch's default thread count; gradient checkpointing only with `--gradient-checkpointing`
  (non-reentrant, per decoder layer: what `rupantor bench train-step --recompute on` does).

Prints the per-phase split (forward incl. loss, backward, optimizer), tokens/s over the timed
steps, the process peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which includes
loading) and the peak RSS during the steps alone (`VmHWM` after resetting it through
`/proc/self/clear_refs` once the model is built). `--json` makes the last line one JSON object.
"""

import argparse
import json
import pathlib
import resource
import time

import bitsandbytes as bnb
import torch
import transformers
from peft import LoraConfig, get_peft_model

DEFAULT_MODEL = pathlib.Path.home() / ".cache/rupantor/models/gemma-3-270m-q4_k_m.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MASK = (1 << 64) - 1


class SplitMix64:
    def __init__(self, seed: int):
        self.state = seed & MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)


def token_ids(batch: int, seq: int, vocab: int, bos: int, seed: int) -> torch.Tensor:
    """The ids `rupantor bench train-step` uses (bench_train.rs `token_ids`)."""
    rng = SplitMix64(seed)
    rows = []
    for _ in range(batch):
        row = [bos] + [1000 + rng.next() % (vocab - 1000) for _ in range(seq - 1)]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


def vm_hwm_bytes() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_hwm() -> bool:
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def quantize_projections(model: torch.nn.Module) -> int:
    """Replaces every q/k/v/o/gate/up/down `nn.Linear` by an NF4 double-quant `Linear4bit`."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name not in TARGETS or not isinstance(child, torch.nn.Linear):
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.float32,
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
            ).to("cpu")
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, q)
            count += 1
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    path = pathlib.Path(a.model).expanduser()
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    n_q = quantize_projections(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
    load_s = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    opt = bnb.optim.AdamW8bit(trainable, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    cfg = model.config
    vocab = cfg.vocab_size
    ids = token_ids(a.batch, a.seq, vocab, cfg.bos_token_id or 2, a.seed)
    rss_after_load = vm_hwm_bytes()
    hwm_reset = reset_hwm()
    print(
        f"model {path.name}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab "
        f"{vocab}; {n_q} projections in NF4 (double quant); LoRA r {a.rank} on "
        f"{len(TARGETS)} targets: {n_trainable} trainable parameters; loaded in {load_s:.1f} s; "
        f"torch {torch.__version__} threads {torch.get_num_threads()}, attention "
        f"{getattr(cfg, '_attn_implementation', '?')}"
    )

    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    losses = []
    for step in range(a.warmup + a.steps):
        timed = step >= a.warmup
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        loss = out.loss
        t_fwd = time.perf_counter()
        loss.backward()
        del out
        t_bwd = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_opt = time.perf_counter()
        losses.append(loss.item())
        if timed:
            phases["forward"] += t_fwd - t
            phases["backward"] += t_bwd - t_fwd
            phases["optimizer"] += t_opt - t_bwd
        print(
            f"step {step + 1}{'' if timed else ' (warmup)'}: loss {loss.item():.4f}, "
            f"forward+loss {t_fwd - t:.2f} s, backward {t_bwd - t_fwd:.2f} s, "
            f"optimizer {t_opt - t_bwd:.3f} s"
        )
    total = sum(phases.values())
    tokens = a.batch * a.seq * a.steps
    tps = tokens / total
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step_peak = vm_hwm_bytes() if hwm_reset else None
    print(
        f"HF transformers + PEFT + bitsandbytes: {tps:.1f} tokens/s "
        f"({a.batch} x {a.seq} tokens, {total / a.steps:.2f} s/step over {a.steps} steps: "
        + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in phases.items())
        + f"); peak RSS {peak / 2**30:.2f} GiB (after load {rss_after_load / 2**30:.2f} GiB"
        + (f", during the steps {step_peak / 2**30:.2f} GiB)" if step_peak else ")")
    )
    if a.json:
        print(
            json.dumps(
                {
                    "impl": "hf",
                    "batch": a.batch,
                    "seq": a.seq,
                    "rank": a.rank,
                    "steps": a.steps,
                    "gradient_checkpointing": a.gradient_checkpointing,
                    "tokens_per_s": tps,
                    "s_per_step": total / a.steps,
                    "phases_s_per_step": {k: v / a.steps for k, v in phases.items()},
                    "peak_rss_bytes": peak,
                    "rss_after_load_bytes": rss_after_load,
                    "step_peak_rss_bytes": step_peak,
                    "trainable_params": n_trainable,
                    "losses": losses,
                    "threads": torch.get_num_threads(),
                }
            )
        )


if __name__ == "__main__":
    main()
