"""The persistent job queue: kill -9 and restart lose no job and run none twice; bind refusal; the store."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from test_server_api import MODEL, free_port, txt2img_workflow, wait_history, wait_running, write_models

from sdlab.server.cli import is_loopback, main
from sdlab.server.jobs import DONE, FAILED, PENDING, RESTART_ERROR, JobStore, QueueFull


@contextmanager
def server_process(root: Path, port: int) -> Iterator[subprocess.Popen]:
    """`python -m sdlab.server` on port with root's folders, until the block ends (or it is killed)."""
    args = [sys.executable, "-m", "sdlab.server", "--port", str(port), "--threads", "1", "-q"]
    args += ["--models-dir", str(root / "models"), "--outputs-dir", str(root / "outputs")]
    args += ["--input-dir", str(root / "input"), "--state-dir", str(root / "state")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (root / "server.log").open("ab") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/queue", timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError((root / "server.log").read_text()) from None
                time.sleep(0.1)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _outputs(root: Path, pattern: str) -> list[Path]:
    return sorted((root / "outputs").glob(pattern))


def test_kill_9_and_restart_lose_no_job_and_run_none_twice(tmp_path: Path) -> None:
    write_models(tmp_path)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    a1111_errors: list[Exception] = []

    def a1111_request() -> None:  # its client dies with the server; the job must survive
        body = {"prompt": "queued", "steps": 2, "width": 32, "height": 32, "seed": 77, "save_images": True}
        body["override_settings"] = {"sd_model_checkpoint": MODEL}
        try:
            httpx.post(base + "/sdapi/v1/txt2img", json=body, timeout=60)
        except httpx.TransportError as e:
            a1111_errors.append(e)

    with server_process(tmp_path, port) as proc, httpx.Client(base_url=base, timeout=60) as client:
        done = client.post("/prompt", json={"prompt": txt2img_workflow(prefix="done")}).json()["prompt_id"]
        assert wait_history(client, done)["status"]["status_str"] == "success"
        running = client.post(
            "/prompt", json={"prompt": txt2img_workflow(steps=10000, size=64, prefix="long")}
        )
        running_id = running.json()["prompt_id"]
        wait_running(client, running_id)
        pending = [
            client.post("/prompt", json={"prompt": txt2img_workflow(prefix=f"after{i}")}).json()["prompt_id"]
            for i in range(2)
        ]
        waiter = threading.Thread(target=a1111_request)
        waiter.start()
        while len(client.get("/queue").json()["queue_pending"]) < 3:
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no shutdown code runs
        proc.wait()
        waiter.join(30)
    assert a1111_errors and not _outputs(tmp_path, "long_*")

    with server_process(tmp_path, port), httpx.Client(base_url=base, timeout=60) as client:
        interrupted = wait_history(client, running_id)
        assert interrupted["status"]["status_str"] == "error" and not interrupted["status"]["completed"]
        assert (
            dict(interrupted["status"]["messages"])["execution_error"]["exception_message"] == RESTART_ERROR
        )
        assert client.get(f"/sdlab/v1/jobs/{running_id}").json()["error"] == RESTART_ERROR
        for prompt_id in pending:
            assert wait_history(client, prompt_id)["status"]["status_str"] == "success"
        assert wait_history(client, done)["status"]["status_str"] == "success"  # still there, with its file
        deadline = time.time() + 30
        while client.get("/prompt").json()["exec_info"]["queue_remaining"] and time.time() < deadline:
            time.sleep(0.05)
    assert [p.name for p in _outputs(tmp_path, "done_*")] == ["done_00001_.png"]
    assert [p.name for p in _outputs(tmp_path, "after*")] == ["after0_00001_.png", "after1_00001_.png"]
    assert [p.name for p in _outputs(tmp_path, "txt2img-images/*.png")] == ["00001-77.png"]
    assert not _outputs(tmp_path, "long_*")  # the job that was running is not run again


def test_store_recovers_fifo_and_bounds(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3", max_pending=2)
    first, second = store.add("comfy", {"n": 1}), store.add("comfy", {"n": 2})
    with pytest.raises(QueueFull):
        store.add("comfy", {"n": 3})
    claimed = store.claim()
    assert claimed is not None and claimed.id == first.id and claimed.request == {"n": 1}
    store.close()
    reopened = JobStore(tmp_path / "jobs.sqlite3", max_pending=2)
    assert reopened.recover() == [first.id]
    assert reopened.get(first.id).state == FAILED and reopened.get(first.id).error == RESTART_ERROR
    assert [j.id for j in reopened.jobs((PENDING,))] == [second.id]
    job = reopened.claim()
    reopened.finish(job.id, DONE, {"images": ["a.png"]}, None)
    assert reopened.get(second.id).result == {"images": ["a.png"]} and reopened.claim() is None
    reopened.close()


def test_public_bind_needs_an_api_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SDLAB_API_KEY", raising=False)
    assert main(["--host", "0.0.0.0", "--port", str(free_port())]) == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in capsys.readouterr().err
    assert main(["--host", "192.168.1.5", "--api-key", ""]) == 2
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com"))
