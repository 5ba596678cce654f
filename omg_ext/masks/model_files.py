"""Checkpoint files of the optional mask models: where they live, how they arrive, how they are checked.

Segment Anything checkpoints live in the WebUI's ``models/sam`` folder, the one other SAM
extensions (e.g. continue-revolution/sd-webui-segment-anything) use, under their official
names, so one download serves them all. A missing file is downloaded from Meta's official
location with a progress bar into a ``.part`` file, its SHA-256 checked, then renamed: a
broken or interrupted download never leaves a file that looks complete. Without network
the error says which file to place where; the mask code then falls back to attention.
"""
from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class ModelFile:
    name: str
    url: str
    sha256: str
    size: int
    """Bytes, for the progress bar."""


SAM_FILES = {
    "vit_b": ModelFile("sam_vit_b_01ec64.pth", SAM_BASE_URL + "sam_vit_b_01ec64.pth",
                       "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375_042_383),
    "vit_l": ModelFile("sam_vit_l_0b3195.pth", SAM_BASE_URL + "sam_vit_l_0b3195.pth",
                       "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1_249_524_607),
    "vit_h": ModelFile("sam_vit_h_4b8939.pth", SAM_BASE_URL + "sam_vit_h_4b8939.pth",
                       "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2_564_550_879),
}


class MissingModelFile(RuntimeError):
    """A model file is not there and could not be fetched; the message tells the user what to do."""


def ensure_file(file: ModelFile, folder: str | os.PathLike, *, download: bool = True,
                opener: Callable = urllib.request.urlopen) -> Path:
    """The path of ``file`` in ``folder``, downloading and checking it first if it is missing."""
    folder = Path(folder)
    path = folder / file.name
    if path.is_file():
        return path
    where = f"download {file.url} and place it in {folder}"
    if not download:
        raise MissingModelFile(f"OMG: {file.name} is missing: {where}")
    part = path.with_name(path.name + ".part")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        digest = _fetch(file, part, opener)
    except OSError as e:  # URLError, no network, disk full
        part.unlink(missing_ok=True)
        raise MissingModelFile(f"OMG: {file.name} is missing and could not be downloaded ({e}): {where}") from e
    if digest != file.sha256:
        part.unlink(missing_ok=True)
        raise MissingModelFile(f"OMG: the download of {file.name} is corrupt (SHA-256 {digest[:12]}…, expected "
                               f"{file.sha256[:12]}…): {where}")
    part.replace(path)
    return path


def _fetch(file: ModelFile, target: Path, opener: Callable) -> str:
    """Stream ``file.url`` into ``target`` with a progress bar; return the SHA-256 of what arrived."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    with opener(file.url) as response, open(target, "wb") as out, \
            tqdm(total=file.size, unit="B", unit_scale=True, desc=f"OMG: downloading {file.name}") as bar:
        while chunk := response.read(1 << 20):
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()
