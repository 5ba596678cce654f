"""OMG vs plain wall time in a running WebUI (A1111 or Forge, ``--api``), side by side in one run.

Each round times one plain txt2img job and one OMG job (two concepts, each with a LoRA)
with the same seed and size, alternating, after a warm-up; the medians and their ratio
are printed, and the same for hires fix.

    python benchmarks/bench_webui.py --url http://127.0.0.1:7861 --loras char1,char2 --size 128 --steps 8 --runs 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url + "/sdapi/v1/txt2img", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=1800) as response:
        return json.load(response)


def timed(url: str, payload: dict) -> float:
    start = time.perf_counter()
    post(url, payload)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--loras", default="char1,char2")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--blend-start", type=float, default=0.3)
    args = parser.parse_args()
    first, second = args.loras.split(",")
    plain = {"prompt": "a man and a woman hugging", "negative_prompt": "", "steps": args.steps, "width": args.size,
             "height": args.size, "sampler_name": "Euler", "cfg_scale": 7, "seed": 11}
    omg = {"alwayson_scripts": {"OMG multi-concept": {"args": [{"enabled": True, "blend_start": args.blend_start, "concepts": [
        {"lora": first, "class_word": "man", "prompt": "a man, red jacket"},
        {"lora": second, "class_word": "woman", "prompt": "a woman, blue dress"}]}]}}}
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6,
             "hr_second_pass_steps": max(1, args.steps // 2), "hr_additional_modules": ["Use same choices"]}
    timed(args.url, plain)  # warm-up: model load, first-call costs
    print(f"{args.url}: {args.size}x{args.size}, {args.steps} steps, blend start {args.blend_start}, "
          f"LoRAs {first}/{second}, median of {args.runs}")
    for label, extra in (("txt2img", {}), ("hires fix x1.5", hires)):
        plain_times, omg_times = [], []
        for _ in range(args.runs):
            plain_times.append(timed(args.url, {**plain, **extra}))
            omg_times.append(timed(args.url, {**plain, **extra, **omg}))
        p, o = statistics.median(plain_times), statistics.median(omg_times)
        print(f"  {label:15s} plain {p:7.2f} s | OMG {o:7.2f} s | OMG/plain {o / p:.2f}")


if __name__ == "__main__":
    main()
