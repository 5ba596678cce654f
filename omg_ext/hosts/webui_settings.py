"""OMG's place in the WebUI around a job: its settings page, the X/Y/Z plot's axes, pass 2's memory budget
from those settings, and saving the layout images beside the job's own."""
from __future__ import annotations

from ..config import CHOICES, XYZ_AXES
from ..engine.memory import MemoryBudget, free_device_bytes
from .mask_models import DOWNLOAD_OPTION, KEEP_OPTION


def add_xyz_axes() -> None:
    """Add the OMG axes to the built-in X/Y/Z plot; each stores its value on ``p.omg_xyz``."""
    from modules import scripts

    found = [x for x in scripts.scripts_data if x.script_class.__module__ == "xyz_grid.py"]
    if not found:
        return
    xyz = found[0].module

    def setter(path):
        def apply(p, x, xs):
            p.__dict__.setdefault("omg_xyz", {})[path] = x
        return apply

    xyz.axis_options.extend(
        xyz.AxisOption(label, kind, setter(path), choices=(lambda c=CHOICES[path]: list(c)) if path in CHOICES else None)
        for label, kind, path in XYZ_AXES
    )


SAVE_OPTION = "omg_save_layout"
MEMORY_OPTION = "omg_pass2_memory_mb"
KEEP_ATTENTION_OPTION = "omg_keep_attention"


def add_settings() -> None:
    """OMG's WebUI settings: saving layout images and mask overlays (off by default), the mask models, pass 2's memory
    and how its layout reference is made."""
    import gradio as gr
    from modules import shared

    section = ("omg", "OMG multi-concept")
    shared.opts.add_option(SAVE_OPTION, shared.OptionInfo(
        False, "Save the OMG layout image and mask overlay beside each image", section=section))
    shared.opts.add_option(DOWNLOAD_OPTION, shared.OptionInfo(
        True, "Download missing Segment Anything / detector models on first use (models/sam, models/omg-detectors)", section=section))
    shared.opts.add_option(KEEP_OPTION, shared.OptionInfo(
        True, "Keep OMG mask models in RAM between jobs (off: free them after each job; never on the GPU while the UNet runs)",
        section=section))
    shared.opts.add_option(MEMORY_OPTION, shared.OptionInfo(
        0, "Most memory one OMG pass-2 UNet call may use, in MB (0: what is free on the GPU; no limit on a CPU)",
        gr.Number, {"precision": 0}, section=section))
    shared.opts.add_option(KEEP_ATTENTION_OPTION, shared.OptionInfo(
        True, "Keep pass 1's cross-attention for pass 2's layout (faster: one UNet row fewer per image; takes up to half "
        "the memory free when pass 1 starts — off: a reference row per image, the same image)", section=section))


def memory_budget(free_bytes=free_device_bytes) -> MemoryBudget:
    """Pass 2's memory: the user's cap from the settings, else the free memory ``free_bytes`` reads."""
    from modules import shared

    megabytes = int(shared.opts.data.get(MEMORY_OPTION, 0) or 0)
    return MemoryBudget(budget_bytes=megabytes << 20 if megabytes > 0 else None, free_bytes=free_bytes)


def save_layout_images(p, generation, infotext: str) -> None:
    """Save the layout image and mask overlay when the WebUI's OMG setting asks for it."""
    from modules import images, shared

    if not shared.opts.data.get(SAVE_OPTION, False):
        return
    for i, pictures in enumerate(generation.layout_images):
        for image, suffix in pictures:
            images.save_image(image, p.outpath_samples, "", p.all_seeds[min(i, len(p.all_seeds) - 1)], p.all_prompts[0],
                              shared.opts.samples_format, info=infotext, p=p, suffix=suffix)
