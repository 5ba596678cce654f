"""Soak a running WebUI (A1111 or Forge, ``--api``) with mixed OMG jobs over its API.

    python benchmarks/bench_soak_webui.py --url http://127.0.0.1:7861 --pid 12345 [--jobs 50] [--loras char1,char2]

Each job draws (fixed seed): OMG on or off, 1–3 concepts (the first two with the given
LoRAs), batch 1–2, hires ×1.5 or not, attention or drawn-region masks, and a fault: none,
an Interrupt sent while it runs, or a bad request (a LoRA that does not exist). After
every job a fixed plain "probe" image is made and compared with the first one: the same
bytes mean the model, its LoRA state and attention came back exactly (what
``weights restored`` counts over the API). ``--pid`` is the WebUI's process: its resident
memory is read from ``/proc`` after each job. Prints per 10 jobs the highest resident
memory, then ``weights restored: N/jobs`` and last ``rss growth: X%`` (mean of the last
10 jobs against the first 10).
"""
from __future__ import annotations

import argparse
import base64
import json
import random
import threading
import time
import urllib.error
import urllib.request


def post(url: str, path: str, payload: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url + path, data=json.dumps(payload or {}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=1800) as response:
            return 200, json.load(response) or {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode() or "{}")


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


BASE = {"prompt": "a man and a woman and a cat on grass", "negative_prompt": "", "steps": 4, "width": 64,
        "height": 64, "sampler_name": "Euler", "cfg_scale": 7, "seed": 11}
WORDS = ["man", "woman", "cat"]


def job_payload(rng: random.Random, loras: list[str]) -> tuple[dict, str, str]:
    omg, k, batch, hires = rng.random() > 0.2, rng.randint(1, 3), rng.randint(1, 2), rng.random() < 0.3
    source, fault = rng.choice(["attention", "regions"]), rng.choice(["none", "none", "interrupt", "bad request"])
    concepts = [{"lora": loras[j] if j < len(loras) else "", "class_word": WORDS[j], "prompt": f"a {WORDS[j]}"} for j in range(k)]
    if fault == "bad request":
        concepts[0]["lora"] = "no_such_lora_file"
    cfg = {"enabled": omg, "blend_start": 0.32, "concepts": concepts, "mask_source": source}
    if source == "regions":
        step = 64 // k
        cfg["regions"] = json.dumps({"width": 64, "height": 64, "boxes": {str(j + 1): [j * step, 0, (j + 1) * step, 64] for j in range(k)}})
    payload = {**BASE, "batch_size": batch, "seed": rng.randint(0, 10**6),
               "alwayson_scripts": {"OMG multi-concept": {"args": [cfg]}}}
    if hires:
        payload.update(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5, hr_second_pass_steps=2,
                       hr_additional_modules=["Use same choices"])
    label = f"{'OMG k=' + str(k) if omg else 'plain':8} batch {batch}{' +hires' if hires else '':7} {source:9} fault: {fault}"
    return payload, fault, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--pid", type=int, required=True, help="the WebUI's process id (its memory is read from /proc)")
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--loras", default="char1,char2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    url, loras, rng = args.url.rstrip("/"), args.loras.split(","), random.Random(args.seed)
    probe = base64.b64decode(post(url, "/sdapi/v1/txt2img", BASE)[1]["images"][0])
    rss, restored, outcomes = [], 0, {}
    for n in range(1, args.jobs + 1):
        payload, fault, label = job_payload(rng, loras)
        timer = threading.Timer(2.0, lambda: post(url, "/sdapi/v1/interrupt")) if fault == "interrupt" else None
        if timer:
            timer.start()
        start = time.perf_counter()
        status, result = post(url, "/sdapi/v1/txt2img", payload)
        if timer:
            timer.join()
        outcome = f"HTTP {status}" if status != 200 else ("interrupted" if fault == "interrupt" else "made")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        same = base64.b64decode(post(url, "/sdapi/v1/txt2img", BASE)[1]["images"][0]) == probe
        restored += same
        rss.append(rss_mb(args.pid))
        print(f"job {n:2d}: {label:45} -> {outcome:9} {time.perf_counter() - start:5.1f}s probe {'same' if same else 'CHANGED'} "
              f"rss {rss[-1]:.0f} MB", flush=True)
        if n % 10 == 0:
            print(f"jobs {n - 9}-{n}: peak RSS after a job {max(rss[-10:]):.0f} MB")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    print(f"weights restored: {restored}/{args.jobs}")
    window = min(10, len(rss))
    print(f"rss growth: {100 * (sum(rss[-window:]) / sum(rss[:window]) - 1):.1f}%")


if __name__ == "__main__":
    main()
