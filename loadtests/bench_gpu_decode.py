"""Decode speed of the transformers engine on a GPU with a Qwen2-Audio-7B-sized model (random weights).

No weights are downloaded: the model is built from Qwen2-Audio-7B-Instruct's architecture (Whisper-large
audio encoder, 128 mels, a 7B Qwen language model) with random bf16 weights on the GPU, and a small local
tokenizer (models/tiny.py) — sizes and speed are the real model's, answers are noise. Generation is fixed
length (EOS suppressed by ``min_new_tokens``), through :class:`serving.backends.hf.TransformersBackend`.

For each batch size: time for 1 new token (prefill + first token) and for N, so the decode cost per
step is ``(t_N - t_1) / (N - 1)``. Reported: output tokens/s and time per output token, against the
memory-bandwidth floor — a decode step must read every language-model weight once (plus the KV cache),
so ``floor = bytes_read / bandwidth``; the bandwidth is the GPU's datasheet figure (``--bandwidth-gbs``
to override) and the one measured here by a device-to-device copy.

    python loadtests/bench_gpu_decode.py [--batches 1,8,32] [--new-tokens 128] [--audio-s 10]

Writes bench_gpu_decode.{json,md} to $OUT (the device tool's output folder) or loadtests/results/.
Not run on this project's CPU machines: it needs CUDA and ~20 GB of GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen2-Audio-7B-Instruct's config.json, as published (architecture only)
QWEN2_AUDIO_7B = {
    "audio_config": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128, max_source_positions=1500),
    "text_config": dict(
        model_type="qwen2", vocab_size=156032, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
}
# datasheet HBM bandwidth, GB/s
BANDWIDTH = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555, "L40S": 864, "L4": 300}


def datasheet_bandwidth(name: str) -> float | None:
    for key, value in BANDWIDTH.items():
        if key.lower() in name.lower():
            return float(value)
    return None


def measured_bandwidth(torch, device: str = "cuda") -> float:
    """GB/s of a large device-to-device copy (reads + writes)."""
    if device != "cuda":
        return float("nan")
    a = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / 10
    del a, b
    torch.cuda.empty_cache()
    return 2 * 2 * 1024**3 / seconds / 1e9


def build(torch, tokenizer_texts, device: str = "cuda", shrink: bool = False):
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor, WhisperFeatureExtractor

    from models.tiny import AUDIO, AUDIO_BOS, AUDIO_EOS, CHAT_TEMPLATE, train_tokenizer

    tokenizer = train_tokenizer(tokenizer_texts, vocab_size=1000)
    tokenizer.chat_template = CHAT_TEMPLATE
    extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=16_000, hop_length=160, chunk_length=30)
    processor = Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                                    audio_token=AUDIO, audio_bos_token=AUDIO_BOS, audio_eos_token=AUDIO_EOS)
    audio, text = dict(QWEN2_AUDIO_7B["audio_config"]), dict(QWEN2_AUDIO_7B["text_config"])
    if shrink:  # --tiny: the code path on a CPU, not a measurement
        audio.update(d_model=64, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=128)
        text.update(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    config = Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", **audio),
        text_config=dict(**text, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO),
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2AudioForConditionalGeneration._from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.eval()
    return processor, model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--audio-s", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="override the datasheet bandwidth")
    p.add_argument("--tiny", action="store_true", help="a shrunken model on the CPU: checks the script, measures nothing")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    device = "cpu" if args.tiny else "cuda"
    if not args.tiny and not torch.cuda.is_available():
        print("bench_gpu_decode: no CUDA device; run it on a GPU machine", file=sys.stderr)
        return 2
    from models.registry import ModelSpec  # noqa: F401  (the same import path the service uses)
    from serving.backends import AudioPrompt
    from serving.backends.hf import TransformersBackend
    from tests.helpers import TINY_TEXTS

    gpu = "cpu (--tiny)" if args.tiny else torch.cuda.get_device_name(0)
    processor, model = build(torch, TINY_TEXTS, device, shrink=args.tiny)
    lm = model.model.language_model if hasattr(model, "model") else model.language_model
    lm_bytes = sum(p.numel() * p.element_size() for p in lm.parameters()) + model.lm_head.weight.numel() * 2
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    backend = TransformersBackend("qwen2-audio-7b-sized", processor, model)
    model.generation_config.min_new_tokens = args.new_tokens  # fixed length: EOS suppressed
    tc = model.config.text_config
    kv_per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * 2
    bw_sheet = args.bandwidth_gbs or datasheet_bandwidth(gpu)
    bw_measured = measured_bandwidth(torch, device)
    rng = np.random.default_rng(0)
    clip = (0.1 * rng.standard_normal(int(args.audio_s * 16_000))).astype(np.float32)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(batch: int, new_tokens: int) -> float:
        model.generation_config.min_new_tokens = new_tokens
        prompts = [AudioPrompt(clip, "Is there a sound of a dog barking in the audio?", new_tokens)] * batch
        best = float("inf")
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            out = backend.generate(prompts)
            sync()
            best = min(best, time.perf_counter() - t0)
            assert all(g.num_tokens == new_tokens for g in out), [g.num_tokens for g in out]
        return best

    timed(1, 2)  # warm-up (kernels, allocator)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        t1 = timed(batch, 1)
        tn = timed(batch, args.new_tokens)
        step = (tn - t1) / (args.new_tokens - 1)
        prompt_len = 750 * args.audio_s / 30 + 30  # audio tokens + chat frame, about
        kv_bytes = batch * kv_per_token * (prompt_len + args.new_tokens / 2)  # mean context over the decode
        floor_bytes = lm_bytes + kv_bytes
        row = {
            "batch": batch, "prefill_plus_first_s": t1, "total_s": tn, "ms_per_step": 1000 * step,
            "output_tokens_per_s": batch / step, "floor_ms_sheet": 1000 * floor_bytes / (bw_sheet * 1e9) if bw_sheet else None,
            "floor_ms_measured": 1000 * floor_bytes / (bw_measured * 1e9),
        }
        row["x_floor_sheet"] = row["ms_per_step"] / row["floor_ms_sheet"] if row["floor_ms_sheet"] else None
        row["x_floor_measured"] = row["ms_per_step"] / row["floor_ms_measured"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    lines = [
        f"GPU: {gpu}; datasheet {bw_sheet} GB/s, measured copy {bw_measured:.0f} GB/s; weights {total_bytes / 1e9:.2f} GB "
        f"(language model + head {lm_bytes / 1e9:.2f} GB, read every decode step); audio {args.audio_s:g} s; {args.new_tokens} new tokens; torch {torch.__version__}",
        "",
        "| batch | prefill+1st s | ms / decode step | output tokens/s | floor ms (sheet) | x floor | floor ms (measured bw) | x floor |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        sheet = f"{r['floor_ms_sheet']:.2f} | {r['x_floor_sheet']:.2f}x" if r["floor_ms_sheet"] else "n/a | n/a"
        lines.append(f"| {r['batch']} | {r['prefill_plus_first_s']:.3f} | {r['ms_per_step']:.2f} | {r['output_tokens_per_s']:.0f} | {sheet} | {r['floor_ms_measured']:.2f} | {r['x_floor_measured']:.2f}x |")
    report = "\n".join(lines)
    print("\n" + report)
    out = Path(os.environ.get("OUT") or ROOT / "loadtests" / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu_decode.md").write_text(report + "\n")
    (out / "bench_gpu_decode.json").write_text(json.dumps({"gpu": gpu, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
