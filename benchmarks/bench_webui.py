"""OMG (two passes, one pass, fast mode) vs plain wall time in a running WebUI (A1111 or Forge, ``--api``), side by side in one run.

Each round times one plain txt2img job, one OMG job (two concepts, each with a LoRA), the
same OMG job with the background redrawn in pass 2 (``"background": "redrawn"``, the default
before 2026-12-04: a host cond row more per image and step), one in the one-pass mode and one in fast
mode with the same seed and size, in turn, after a warm-up; the medians and their ratios to plain are
printed, and the same for hires fix (unless ``--no-hires``). ``--jobs`` times some of them only (plain always).
``--controlnet NAME`` adds one ControlNet unit (that model, no preprocessor, a block as hint)
to every job, plain included: the ratios are then OMG + ControlNet to ControlNet alone.
``--pairs N`` times only plain and OMG (two passes, or ``--mode``), N rounds in turns whose order swaps each round
(plain first, then OMG first: whatever the previous job leaves costs both alike), and prints each
round's ratio and their median: a mode's target figure, with less of this machine's drift in it.
``--regional-prompter`` adds the incumbent, timed in the same rounds: Regional Prompter
(``hako-mikan/sd-webui-regional-prompter``, installed in that WebUI) in Latent mode with two
regions side by side, one LoRA each (``a man <lora:A:1> BREAK a woman <lora:B:1>``), as users
split two characters today.

    python benchmarks/bench_webui.py --url http://127.0.0.1:7861 --loras char1,char2 --size 128 --steps 8 --runs 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omg_ext.config import MODES, OmgConfig  # noqa: E402  (plain Python: no torch needed)


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url + "/sdapi/v1/txt2img", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=1800) as response:
        return json.load(response)


def timed(url: str, payload: dict) -> float:
    start = time.perf_counter()
    post(url, payload)
    return time.perf_counter() - start


def controlnet_unit(url: str, name: str, size: int) -> dict:
    """A ControlNet unit of the host's model ``name`` ("name [hash]" looked up) with a white block on black as hint."""
    import base64
    import io

    from PIL import Image, ImageDraw

    with urllib.request.urlopen(url + "/controlnet/model_list", timeout=60) as response:
        full = next(n for n in json.load(response)["model_list"] if n.split(" [")[0] == name)
    with urllib.request.urlopen(url + "/controlnet/module_list", timeout=60) as response:
        none = next(m for m in json.load(response)["module_list"] if m.lower() == "none")  # "none" in sd-webui-controlnet
    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).rectangle((size // 5, size // 8, size // 2, size - size // 16), fill="white")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"enabled": True, "module": none, "model": full, "weight": 1.0, "image": base64.b64encode(buffer.getvalue()).decode()}


def regional_prompter_latent(first: str, second: str) -> dict:
    """Regional Prompter's API args (its README's table, in order): active, Matrix mode split into columns
    1:1, no base or common prompt, Latent calculation; the two regions' prompts carry one LoRA each."""
    args = [True, False, "Matrix", "Columns", "Mask", "Prompt", "1,1", "0", False, False, False, "Latent", False,
            "0", "0", "0", "", "0", "0", False]
    return {"prompt": f"a man hugging <lora:{first}:1> BREAK a woman hugging <lora:{second}:1>",
            "alwayson_scripts": {"Regional Prompter": {"args": args}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--loras", default="char1,char2")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--blend-start", type=float, default=OmgConfig.blend_start)
    parser.add_argument("--no-hires", action="store_true", help="time txt2img only")
    parser.add_argument("--controlnet", help="a ControlNet model name: every job (plain too) gets one unit of it")
    parser.add_argument("--regional-prompter", action="store_true", help="also time Regional Prompter's Latent mode (installed in that WebUI)")
    parser.add_argument("--pairs", type=int, help="only plain and OMG, this many rounds in alternating order")
    parser.add_argument("--mode", default="two passes", choices=MODES, help="the OMG mode --pairs times")
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS), help="the jobs to time (plain always)")
    args = parser.parse_args()
    first, second = args.loras.split(",")
    plain = {"prompt": "a man and a woman hugging", "negative_prompt": "", "steps": args.steps, "width": args.size,
             "height": args.size, "sampler_name": "Euler", "cfg_scale": 7, "seed": 11}
    omg = {"alwayson_scripts": {"OMG multi-concept": {"args": [{"enabled": True, "blend_start": args.blend_start, "concepts": [
        {"lora": first, "class_word": "man", "prompt": "a man, red jacket"},
        {"lora": second, "class_word": "woman", "prompt": "a woman, blue dress"}]}]}}}
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6,
             "hr_second_pass_steps": max(1, args.steps // 2), "hr_additional_modules": ["Use same choices"]}
    if args.controlnet:
        plain["alwayson_scripts"] = {"ControlNet": {"args": [controlnet_unit(args.url, args.controlnet, args.size)]}}
        omg["alwayson_scripts"].update(plain["alwayson_scripts"])
    timed(args.url, plain)  # warm-up: model load, first-call costs
    print(f"{args.url}: {args.size}x{args.size}, {args.steps} steps, blend start {args.blend_start}, "
          f"LoRAs {first}/{second}, " + (f"{args.pairs} pairs" if args.pairs else f"median of {args.runs}")
          + (f", ControlNet {args.controlnet} on every job" if args.controlnet else ""))
    if args.pairs:
        return time_pairs(args.url, plain, {**plain, **omg_with(omg, mode=args.mode)}, args.pairs)
    jobs = {"plain": {}, "OMG": omg,
            "OMG redrawn": omg_with(omg, background="redrawn"),  # pass 2 draws the background again, as before 2026-12-04
            "one pass": omg_with(omg, mode="one pass"), "fast": omg_with(omg, mode="fast")}
    jobs = {name: job for name, job in jobs.items() if name == "plain" or name in args.jobs}
    if args.regional_prompter:
        jobs["RP Latent"] = regional_prompter_latent(first, second)
        if args.controlnet:
            jobs["RP Latent"]["alwayson_scripts"].update(plain["alwayson_scripts"])
    for label, extra in (("txt2img", {}), ("hires fix x1.5", hires))[:1 if args.no_hires else 2]:
        times: dict[str, list[float]] = {name: [] for name in jobs}
        for _ in range(args.runs):
            for name, job in jobs.items():
                times[name].append(timed(args.url, {**plain, **extra, **job}))
        median = {name: statistics.median(times[name]) for name in jobs}
        p = median["plain"]
        print(f"  {label}: " + " | ".join(f"{name} {t:.2f} s" for name, t in median.items()))
        print("    " + " | ".join(f"{name}/plain {t / p:.2f}" for name, t in median.items() if name != "plain"))
        if args.regional_prompter:
            rp = median["RP Latent"]
            print("    " + " | ".join(f"{name}/RP Latent {t / rp:.2f}" for name, t in median.items()
                                    if name not in ("plain", "RP Latent")))


JOBS = ("OMG", "OMG redrawn", "one pass", "fast")


def omg_with(omg: dict, **settings) -> dict:
    """The OMG job with some settings changed (a deep copy)."""
    job = json.loads(json.dumps(omg))
    job["alwayson_scripts"]["OMG multi-concept"]["args"][0].update(settings)
    return job


def time_pairs(url: str, plain: dict, omg: dict, rounds: int) -> None:
    """Plain and OMG in turns, the order swapped each round; each round's ratio and the median. A first
    OMG job is not timed: the host keeps its prompts' conditioning between jobs, and OMG its concepts."""
    timed(url, omg)
    ratios = []
    for i in range(rounds):
        jobs = [("plain", plain), ("OMG", omg)][::1 if i % 2 == 0 else -1]
        seconds = {name: timed(url, job) for name, job in jobs}
        ratios.append(seconds["OMG"] / seconds["plain"])
        print(f"  round {i + 1}: plain {seconds['plain']:.2f} s | OMG {seconds['OMG']:.2f} s | OMG/plain {ratios[-1]:.3f}", flush=True)
    print(f"  OMG/plain median of {rounds} rounds: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
