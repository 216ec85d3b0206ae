"""A DPO step of the production 7B architectures on GPUs: step time and peak memory, bf16 + gradient checkpointing
against QLoRA, on 1 worker and (with two GPUs) 2 data-parallel workers.

The models are Qwen2-Audio-7B-Instruct and the Qwen2.5-Omni-7B thinker built from their configs
(``models.memory.production_config``) with random weights, so nothing is downloaded. Each step is what
``earwitness train dpo`` runs: LoRA r=16, α=32 on the language model, one pair of 30 s clips (750 audio tokens and a
short question and answer on each side), the policy's forward and backward and the reference's forward with the
adapter disabled, then an AdamW step. Time is the mean of 3 steps after one warm-up step; memory is
``torch.cuda.max_memory_allocated``. Beside each row: the estimate of ``models.memory`` for the same step.

    python -m loadtests.bench_gpu_train                  # a GPU machine, < 5 min
    python -m loadtests.bench_gpu_train --scale tiny     # the same code path on tiny configs (CPU): checks it runs

Without CUDA (and without ``--scale tiny``) it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch

from models.memory import count_parameters, dpo_memory, production_config

AUDIO_TOKENS, TEXT_TOKENS, ANSWER_TOKENS = 750, 40, 12
MODES = ("bf16+gc", "qlora")


def tiny(config):
    """The same architecture at a size a CPU runs in seconds (layers, widths and vocabulary cut down)."""
    text, audio = config.text_config, config.audio_config
    text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.vocab_size = 1, 64, 128, 2000
    for key, value in (("audio_token_index", 1999), ("audio_token_id", 1999), ("audio_start_token_id", 1997), ("audio_end_token_id", 1998)):
        if getattr(config, key, None) is not None:
            setattr(config, key, value)
    text.num_attention_heads, text.num_key_value_heads = 4, 2
    if getattr(text, "rope_parameters", None) and "mrope_section" in text.rope_parameters:
        text.rope_parameters = {**text.rope_parameters, "mrope_section": [2, 3, 3]}
    audio.encoder_layers, audio.d_model, audio.encoder_ffn_dim, audio.encoder_attention_heads = 1, 64, 128, 2
    if hasattr(audio, "output_dim"):
        audio.output_dim = 64
    if hasattr(config, "vision_config"):
        vision = config.vision_config
        vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads, vision.out_hidden_size = 1, 32, 64, 2, 64
        vision.fullatt_block_indexes = [0]
    return config


def build(family: str, mode: str, scale: str, device: torch.device):
    """The random-weight model with LoRA on its language model (4-bit linears under QLoRA)."""
    from peft import get_peft_model

    from models.families import model_class_of_type
    from train.lora import lora_config

    config = production_config(family)
    if scale == "tiny":
        config = tiny(config)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        model = model_class_of_type(config.model_type)._from_config(config, dtype=dtype)
    if mode == "qlora":
        quantize_language_model(model, device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return config, get_peft_model(model, lora_config(model, r=16, alpha=32, dropout=0.0))


def quantize_language_model(model, device: torch.device) -> None:
    """The decoder layers' linears as bitsandbytes NF4 (double-quantised), as QLoRA loads them."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise SystemExit("QLoRA rows need bitsandbytes: pip install bitsandbytes") from None
    from models.memory import LORA_TARGETS

    for name, module in list(model.named_modules()):
        if not (isinstance(module, torch.nn.Linear) and ".language_model.layers." in f".{name}" and name.rsplit(".", 1)[-1] in LORA_TARGETS):
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None, compute_dtype=torch.bfloat16,
                              quant_type="nf4", compress_statistics=True)
        q.weight = bnb.nn.Params4bit(module.weight.data.to("cpu"), requires_grad=False, quant_type="nf4", compress_statistics=True)
        if module.bias is not None:
            q.bias = module.bias
        setattr(parent, name.rsplit(".", 1)[1], q.to(device))
    torch.cuda.empty_cache()


def batch(config, device: torch.device) -> dict:
    """One pair as the DPO collator lays it out: chosen and rejected rows, each a 30 s clip, question and answer."""
    audio = getattr(config, "audio_token_index", None) or config.audio_token_id
    text = [11] * (TEXT_TOKENS - 2)
    ids = []
    for answer in (13, 14):  # the chosen and the rejected answer differ
        start = getattr(config, "audio_start_token_id", None)
        end = getattr(config, "audio_end_token_id", None)
        audio_part = ([start] if start else []) + [audio] * AUDIO_TOKENS + ([end] if end else [])
        ids.append(text[:4] + audio_part + text[4:] + [answer] * ANSWER_TOKENS)
    input_ids = torch.tensor(ids, device=device)
    frames = AUDIO_TOKENS * 4  # 10 ms mel frames; the encoders pool 4 to an audio token
    features = torch.randn(2, config.audio_config.num_mel_bins, frames, device=device)
    mask = torch.zeros_like(input_ids)
    mask[:, -ANSWER_TOKENS:] = 1
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "input_features": features,
            "feature_attention_mask": torch.ones(2, frames, dtype=torch.long, device=device), "completion_mask": mask}


def sequence_logps(model, inputs: dict) -> torch.Tensor:
    mask = inputs["completion_mask"][:, 1:]
    forward = {k: v for k, v in inputs.items() if k != "completion_mask"}
    forward["input_features"] = forward["input_features"].to(next(model.parameters()).dtype)
    logits = model(**forward).logits[:, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * mask).sum(-1)


def dpo_step(model, peft_model, optimizer, inputs: dict, beta: float = 0.1) -> float:
    policy = sequence_logps(model, inputs)
    with torch.no_grad(), peft_model.disable_adapter():
        reference = sequence_logps(peft_model, inputs)
    margin = (policy[0] - reference[0]) - (policy[1] - reference[1])
    loss = -torch.nn.functional.logsigmoid(beta * margin)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def measure(family: str, mode: str, scale: str, rank: int = 0, world: int = 1) -> dict:
    device = torch.device(f"cuda:{rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    config, peft_model = build(family, mode, scale, device)
    model = peft_model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(peft_model, device_ids=[rank] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5)
    inputs = batch(config, device)
    dpo_step(model, peft_model, optimizer, inputs)
    _sync(device)
    started = time.perf_counter()
    for _ in range(3):
        dpo_step(model, peft_model, optimizer, inputs)
    _sync(device)
    step_s = (time.perf_counter() - started) / 3
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    estimate = dpo_memory(count_parameters(production_config(family) if scale == "full" else tiny(production_config(family))),
                          "qlora" if mode == "qlora" else "bf16+gc", 1, AUDIO_TOKENS + TEXT_TOKENS + ANSWER_TOKENS)["total"]
    return {"family": family, "mode": mode, "workers": world, "step_s": step_s, "peak_gib": peak, "estimate_gib": estimate}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ddp_worker(rank: int, world: int, family: str, mode: str, scale: str, port: int, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world)
    try:
        results[rank] = measure(family, mode, scale, rank, world)
    finally:
        dist.destroy_process_group()


def measure_ddp(family: str, mode: str, scale: str, world: int = 2) -> dict:
    """The step on ``world`` data-parallel workers (one GPU each); the slowest worker's time, the largest peak."""
    import torch.multiprocessing as mp


    with socket.socket() as probe:  # a free port for the process group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(world, family, mode, scale, port, results), nprocs=world, join=True)
        rows = list(results.values())
    return {**rows[0], "step_s": max(r["step_s"] for r in rows), "peak_gib": max(r["peak_gib"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["qwen2-audio", "qwen2.5-omni-thinker"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    args = parser.parse_args(argv)
    if args.scale == "full" and not torch.cuda.is_available():
        print("bench_gpu_train: skipped, no CUDA device (the 7B step needs a GPU; --scale tiny runs the code path on CPU)")
        return 0
    gpus = torch.cuda.device_count()
    rows = []
    for family in args.families:
        for mode in args.modes:
            if mode == "qlora" and not torch.cuda.is_available():
                print(f"{family} {mode}: skipped, bitsandbytes' 4-bit kernels need CUDA", file=sys.stderr)
                continue
            rows.append(measure(family, mode, args.scale))
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            if gpus >= 2 or args.scale == "tiny":
                rows.append(measure_ddp(family, mode, args.scale))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"DPO step, 1 pair of 30 s clips ({AUDIO_TOKENS + TEXT_TOKENS + ANSWER_TOKENS} tokens a side), LoRA r=16 on the LM, {device}"
          + ("" if gpus >= 2 or args.scale == "tiny" else "; 2 workers need 2 GPUs: one GPU here, those rows left out"))
    print("| model | mode | workers | step (s) | peak memory (GiB) | estimate (GiB) |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['family']} | {r['mode']} | {r['workers']} | {r['step_s']:.2f} | {r['peak_gib']:.1f} | {r['estimate_gib']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
