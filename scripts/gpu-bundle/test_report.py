"""Tests of report.py on sample logs shaped like what run.sh's steps print (python3 standard
library only):

    python3 scripts/gpu-bundle/test_report.py
"""

import json
import pathlib
import sys
import tempfile
import unittest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import report  # noqa: E402

GIB = 1 << 30

QUANT = {
    "device": "cuda", "gpu": "NVIDIA H200", "rows": 3584, "cols": 14336, "nf4_bytes": 26_492_932,
    "dequant": [
        {"dtype": "f32", "dequant_ms": 0.2, "copy_ms": 0.1, "dequant_gb_per_s": 1000.0,
         "dequant_traffic_gb_per_s": 1100.0, "copy_gb_per_s": 2000.0, "copy_traffic_gb_per_s": 4000.0, "ratio": 0.5},
        {"dtype": "bf16", "dequant_ms": 0.06, "copy_ms": 0.055, "dequant_gb_per_s": 1700.0,
         "dequant_traffic_gb_per_s": 2000.0, "copy_gb_per_s": 1860.0, "copy_traffic_gb_per_s": 3700.0, "ratio": 0.92},
    ],
    "copy_traffic_gb_per_s": 4000.0,
    "gemv": [
        {"batch": 1, "us": 10.0, "bytes": 26_500_000, "gb_per_s": 2650.0, "ratio_vs_copy": 0.6625},
        {"batch": 8, "us": 20.0, "bytes": 26_800_000, "gb_per_s": 1340.0, "ratio_vs_copy": 0.335},
    ],
}

TRAIN = {
    "impl": "rupantor",
    "modes": [
        {"impl": "rupantor", "recompute": False, "tokens_per_s": 6000.0, "peak_gpu_bytes": 12 * GIB, "s_per_step": 0.17},
        {"impl": "rupantor", "recompute": True, "tokens_per_s": 5000.0, "peak_gpu_bytes": 7 * GIB, "s_per_step": 0.2},
    ],
}

DECODE = {
    "model": "random:gemma2-9b@0",
    "results": [
        {"batch": 1, "prefill_tok_s": 3000.0, "decode_tok_s": 150.0, "peak_rss_mib": 900.0, "peak_gpu_mib": 7000.0},
        {"batch": 8, "prefill_tok_s": 9000.0, "decode_tok_s": 800.0, "peak_rss_mib": 900.0, "peak_gpu_mib": 7400.0},
    ],
}


def hf_train(gc, quant, tps, peak):
    return {"impl": "hf", "mode": "train", "quant": quant, "gradient_checkpointing": gc,
            "tokens_per_s": tps, "peak_gpu_bytes": peak, "s_per_step": 1024 / tps}


def hf_decode(quant, b1, b8):
    return {"impl": "hf", "mode": "decode", "quant": quant, "results": [
        {"batch": 1, "prefill_tok_s": 500.0, "decode_tok_s": b1, "peak_gpu_bytes": 20 * GIB},
        {"batch": 8, "prefill_tok_s": 900.0, "decode_tok_s": b8, "peak_gpu_bytes": 21 * GIB},
    ]}


TEST_LOG_OK = """
running 3 tests
test dequant_matches_cpu ... ok
test gemv_matches_reference ... ok
test bandwidth ... ignored

test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.20s
"""

TEST_LOG_FAIL = """
running 2 tests
test logits_match_cpu ... FAILED
test loss_matches_cpu ... ok

failures:

---- logits_match_cpu stdout ----
SKIPPED logits_match_cpu: no CUDA device
thread 'logits_match_cpu' panicked

test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.50s
"""


class ReportTest(unittest.TestCase):
    def write_logs(self, root, hf):
        logs = root / "logs"
        logs.mkdir()
        rows = [
            ("test-rupantor-quant-cuda_kernels", "ok", "3", "0", "120", "x", TEST_LOG_OK),
            ("test-rupantor-model-gpu_parity", "failed", "9", "101", "120", "x", TEST_LOG_FAIL),
            ("bench-quant", "ok", "8", "0", "60", "x", "NF4 ...\n" + json.dumps(QUANT) + "\n"),
            ("bench-train-step", "ok", "70", "0", "170", "x",
             "line\n" + json.dumps(TRAIN) + "\nwarning: printed after the summary\n"),
            ("bench-decode", "ok", "30", "0", "90", "x", json.dumps(DECODE) + "\n"),
            ("smoke-train", "ok", "50", "0", "110", "x", "step 20/20\ndone\n"),
            ("smoke-generate", "timeout", "75", "124", "75", "x", "generating\n"),
        ]
        rows += hf
        with (logs / "steps.tsv").open("w") as f:
            f.write("name\tstatus\tseconds\trc\tlimit_s\tcommand\n")
            for name, status, secs, rc, limit, cmd, log in rows:
                f.write("\t".join([name, status, secs, rc, limit, cmd]) + "\n")
                (logs / f"{name}.log").write_text(log)
        (logs / "gpu.txt").write_text("NVIDIA H200, 580.159.03, 143771 MiB\n")
        bundle = root / "bundle"
        bundle.mkdir()
        (bundle / "BUILD.txt").write_text("rupantor abc123 (dirty), built 2026-12-04\n")
        return logs, bundle

    def test_measured_qlora_baseline(self):
        with tempfile.TemporaryDirectory() as d:
            root = pathlib.Path(d)
            logs, bundle = self.write_logs(root, [
                ("hf-train-gc-on", "ok", "40", "0", "100", "x", json.dumps(hf_train(True, "nf4", 2000.0, 14 * GIB))),
                ("hf-decode", "ok", "40", "0", "90", "x", json.dumps(hf_decode("nf4", 10.0, 64.0))),
                ("hf-train-gc-off", "ok", "40", "0", "90", "x", json.dumps(hf_train(False, "nf4", 2400.0, 30 * GIB))),
            ])
            r = report.build_report(logs, bundle)
            self.assertEqual(r["gpu"], {"name": "NVIDIA H200", "driver": "580.159.03", "memory": "143771 MiB"})
            self.assertEqual(r["baseline_for_ratios"], "measured in this run")
            x = r["ratios"]
            self.assertAlmostEqual(x["train_tokens_per_s_recompute_on_vs_hf_gc_on"], 2.5)
            self.assertAlmostEqual(x["train_peak_gpu_recompute_on_vs_hf_gc_on"], 0.5)
            self.assertAlmostEqual(x["train_tokens_per_s_recompute_off_vs_hf_gc_off"], 2.5)
            self.assertAlmostEqual(x["decode_tok_s_batch1_vs_hf"], 15.0)
            self.assertAlmostEqual(x["decode_tok_s_batch8_vs_hf"], 12.5)
            self.assertAlmostEqual(x["dequant_bf16_vs_copy"], 0.92)
            self.assertAlmostEqual(x["gemv_batch1_vs_copy"], 0.6625)
            met = {g["what"]: g["met"] for g in r["goals"]}
            self.assertIs(met["dequant f32 vs d2d copy"], False)
            self.assertIs(met["dequant bf16 vs d2d copy"], True)
            self.assertIs(met["fused GEMV batch 1 vs copy bandwidth"], False)
            self.assertIs(met["train step tokens/s vs HF (recompute / gradient checkpointing on)"], True)
            self.assertIs(met["train step peak GPU memory vs HF (same)"], True)
            self.assertIs(met["decode batch 1 vs HF"], True)
            self.assertIs(met["decode batch 1 tokens/s"], True)
            tests = {t["name"]: t for t in r["tests"]}
            self.assertEqual(tests["rupantor-quant-cuda_kernels"]["passed"], 2)
            self.assertEqual(tests["rupantor-quant-cuda_kernels"]["ignored"], 1)
            self.assertEqual(tests["rupantor-model-gpu_parity"]["failures"], ["logits_match_cpu"])
            self.assertEqual(tests["rupantor-model-gpu_parity"]["skipped"], ["logits_match_cpu"])
            self.assertEqual(r["smoke"]["generate"], "timeout")
            md = report.markdown(r)
            self.assertIn("NVIDIA H200", md)
            self.assertIn("| train step peak GPU memory vs HF (same) | 0.50 | <= 0.5 | yes |", md)
            self.assertIn("logits_match_cpu", md)

    def test_recorded_baseline_when_bitsandbytes_is_missing(self):
        with tempfile.TemporaryDirectory() as d:
            root = pathlib.Path(d)
            logs, bundle = self.write_logs(root, [
                ("hf-train-gc-on", "ok", "40", "0", "100", "x", json.dumps(hf_train(True, "bf16", 2500.0, 25 * GIB))),
                ("hf-decode", "ok", "40", "0", "90", "x", json.dumps(hf_decode("bf16", 20.0, 100.0))),
                ("hf-train-gc-off", "failed", "3", "1", "90", "x", "Traceback\nRuntimeError: boom\n"),
                ("hf-gemv", "skipped", "0", "-", "45", "x", ""),
            ])
            r = report.build_report(logs, bundle)
            self.assertIn("issue #13", r["baseline_for_ratios"])
            x = r["ratios"]
            self.assertAlmostEqual(x["train_tokens_per_s_recompute_on_vs_hf_gc_on"], 5000.0 / 1864.0)
            self.assertAlmostEqual(x["train_peak_gpu_recompute_on_vs_hf_gc_on"], 7.0 / 14.1)
            self.assertAlmostEqual(x["decode_tok_s_batch1_vs_hf"], 150.0 / 10.9)
            b = r["ratios_vs_hf_bf16_lora"]
            self.assertAlmostEqual(b["train_tokens_per_s_recompute_on_vs_hf_bf16_lora_gc_on"], 2.0)
            self.assertAlmostEqual(b["decode_tok_s_batch8_vs_hf_bf16"], 8.0)
            self.assertIsNone(r["hf"]["train_gc_off"])
            md = report.markdown(r)
            self.assertIn("HF + bitsandbytes (recorded)", md)
            self.assertIn("HF (bf16)", md)

    def test_a_run_with_nothing_measured_still_reports(self):
        with tempfile.TemporaryDirectory() as d:
            root = pathlib.Path(d)
            logs = root / "logs"
            logs.mkdir()
            (logs / "steps.tsv").write_text(
                "name\tstatus\tseconds\trc\tlimit_s\tcommand\nbench-quant\tdry\t0\t-\t60\tx\n"
            )
            r = report.build_report(logs, root)
            self.assertIsNone(r["gpu"]["name"])
            self.assertTrue(all(g["met"] is None for g in r["goals"]))
            self.assertIn("unmeasured", report.markdown(r))
            self.assertIsNone(report.last_json(logs / "missing.log"))


if __name__ == "__main__":
    unittest.main()
