"""The optional mask models inside a WebUI: its models folder, its device, its settings.

Segment Anything checkpoints go to ``models/sam`` (shared with other SAM extensions),
detectors to ``models/omg-detectors``. Each is loaded on first use into a ``ModelSlot``
(at most one SAM, one detector), and parked on the CPU as soon as the masks are made,
before pass 2: the UNet never shares the device with them. "Free OMG mask models" in the
settings (or the option to keep none) drops them entirely.
"""
from __future__ import annotations

import os

import torch

from ..config import OmgConfig
from ..masks.detector import available_backend, load_detector
from ..masks.model_files import SAM_FILES, ensure_file
from ..masks.model_status import describe_model_files
from ..masks.segment import ModelSlot, load_sam, segment
from ..masks.sources import MaskModels

SAM_SLOT, DETECTOR_SLOT = ModelSlot(), ModelSlot()
KEEP_OPTION = "omg_keep_mask_models"
DOWNLOAD_OPTION = "omg_download_mask_models"


def _option(name: str, default: bool) -> bool:
    from modules import shared

    return bool(shared.opts.data.get(name, default))


def _folder(name: str) -> str:
    from modules import paths

    return os.path.join(paths.models_path, name)


def _device() -> torch.device:
    from modules import devices

    return devices.device


def mask_models(cfg: OmgConfig) -> MaskModels:
    """Loaders for the job's SAM model and detector (called only by sources that need them)."""
    download = _option(DOWNLOAD_OPTION, True)

    def sam():
        path = ensure_file(SAM_FILES[cfg.sam_model], _folder("sam"), download=download)
        model = SAM_SLOT.get((cfg.sam_model, str(path)), lambda: load_sam(cfg.sam_model, path)).to(_device())
        return lambda image, prompts: segment(model, image, prompts)

    def detector():
        backend = available_backend(cfg.detector)
        found = DETECTOR_SLOT.get(backend, lambda: load_detector(backend, _folder("omg-detectors"), local_only=not download))
        found.model.to(_device())
        return found

    return MaskModels(sam=sam, detector=detector)


def model_files_status(mask_source: str, sam_model: str, detector: str) -> str:
    """The accordion's line on the model files the picked source needs, in this WebUI's folders."""
    return describe_model_files(mask_source, sam_model, detector, _folder("sam"), _folder("omg-detectors"),
                                _option(DOWNLOAD_OPTION, True))


def release_mask_models() -> None:
    """After the masks: park the models on the CPU (kept for the next job) or drop them, per the settings."""
    if not _option(KEEP_OPTION, True):
        free_mask_models()
        return
    if SAM_SLOT.model is not None:
        SAM_SLOT.model.to("cpu")
    if DETECTOR_SLOT.model is not None:
        DETECTOR_SLOT.model.model.to("cpu")


def free_mask_models() -> None:
    SAM_SLOT.free()
    DETECTOR_SLOT.free()
