"""comfy-catapult 3.0.0 (a ComfyUI job client) against `sdlab serve`: it runs the default workflow and gets
the saved image. It pins websockets 12; under websockets >= 14 its /ws monitor fails on every connect
(`connect(..., extra_headers=...)` is the legacy client's keyword: TypeError, logged and retried), and it
learns of the finished job from its other loop, which polls /queue, /history and /system_stats. Its
`PostFree` sends a form body where ComfyUI's /free reads JSON (a 500 on ComfyUI, a 400 here), so it is
not called."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from test_comfy_frontend import settings, template_prompt
from test_server_api import serving


def test_comfy_catapult_runs_the_default_workflow_and_gets_the_saved_image(tmp_path: Path) -> None:
    api_client = pytest.importorskip("comfy_catapult.api_client")
    catapult = pytest.importorskip("comfy_catapult.catapult")
    torch.set_num_threads(1)
    prompt = template_prompt(steps=3)
    (save,) = [k for k, node in prompt.items() if node["class_type"] == "SaveImage"]

    async def run(url: str) -> tuple[dict, bytes]:
        async with api_client.ComfyAPIClient(comfy_api_url=url) as client:
            async with catapult.ComfyCatapult(comfy_client=client, debug_path=None) as jobs:
                job = jobs.Catapult(job_id="apple", prepared_workflow=prompt, important=[save])
                history = await asyncio.wait_for(job, 120)
            (image,) = history["outputs"][save]["images"]
            png = await client.GetView(
                folder_type=image["type"], subfolder=image["subfolder"], filename=image["filename"]
            )
            return image, png

    with serving(settings(tmp_path)) as url:
        image, png = asyncio.run(run(url))
    assert image == {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}
    assert png == (tmp_path / "outputs" / "ComfyUI_00001_.png").read_bytes()
