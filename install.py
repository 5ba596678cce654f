"""Run by the WebUI at start-up: install what requirements.txt lists and the WebUI lacks.

Uses the WebUI's own ``launch`` helpers, so packages go into the WebUI's environment and
nothing is reinstalled when already present (the user's packages are never upgraded).
"""
from pathlib import Path

import launch  # provided by the WebUI when it runs install.py

REQUIREMENTS = Path(__file__).with_name("requirements.txt")


def requirements() -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in REQUIREMENTS.read_text().splitlines())
    return [line for line in lines if line]


for requirement in requirements():
    name = requirement.split(";")[0].split("=")[0].split("<")[0].split(">")[0].split("[")[0].strip()
    if not launch.is_installed(name):
        launch.run_pip(f"install {requirement}", f"sd-webui-omg requirement: {requirement}")
