"""What the chosen mask source needs on disk, said in the accordion before the user generates.

Without network a missing checkpoint makes generation fall back to attention masks; the
user should not have to generate to learn which file to place where, so the accordion
shows it as soon as a source, SAM model or detector is picked.
"""
from __future__ import annotations

from pathlib import Path

from .detector import BACKENDS, available_backend
from .model_files import SAM_FILES, MissingModelFile


def detector_cached(model_id: str, folder: str | Path) -> bool:
    """Whether ``from_pretrained(model_id, cache_dir=folder)`` finds a snapshot (the Hugging Face cache layout)."""
    snapshots = Path(folder) / ("models--" + model_id.replace("/", "--")) / "snapshots"
    return any(snapshots.glob("*/config.json"))


def describe_model_files(mask_source: str, sam_model: str, detector: str, sam_folder: str | Path,
                         detector_folder: str | Path, download: bool) -> str:
    """A Markdown line per model file the source needs: where it is, or what the user has to do."""
    needed = []  # (in place, said when in place, said when it will be downloaded, said when the user must place it)
    if mask_source.endswith("+sam"):
        file = SAM_FILES.get(sam_model)
        if file is None:
            return f"Unknown Segment Anything model {sam_model!r}."
        path, what = Path(sam_folder) / file.name, f"Segment Anything {sam_model}"
        needed.append((path.is_file(), f"{what}: `{path}`",
                       f"{what}: `{file.name}` ({file.size / 2**20:.0f} MB) is not in `{sam_folder}` yet; "
                       f"it is downloaded from {file.url} on first use.",
                       f"{what}: download {file.url} and place it in `{sam_folder}`"))
    if mask_source == "detector+sam":
        try:
            backend = available_backend(detector)
        except MissingModelFile as e:
            return str(e)
        model_id = BACKENDS[backend][1]
        what = f"Detector: {backend}" + ("" if detector in ("auto", backend) else f" (the installed transformers has no {detector})")
        needed.append((detector_cached(model_id, detector_folder), f"{what}, `{model_id}` in `{detector_folder}`",
                       f"{what}; `{model_id}` is downloaded from https://huggingface.co/{model_id} "
                       f"into `{detector_folder}` on first use.",
                       f"{what}; download https://huggingface.co/{model_id} into `{detector_folder}`"))
    if not needed:
        return f"The {mask_source} mask source needs no model file."
    lines = [there if present else auto if download else manual + " (downloads are off in Settings → OMG multi-concept)."
             for present, there, auto, manual in needed]
    if not all(present for present, *_ in needed):
        lines.append("Without the file, generation falls back to attention masks and says so in the infotext.")
    return "\n\n".join(lines)
