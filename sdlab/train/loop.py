"""The one training loop every recipe runs: AdamW with warmup, gradient clipping, EMA weights, checkpoints
that resume exactly, DistributedDataParallel under torchrun, a tqdm bar and a JSON-lines log.

A recipe hands the loop a `Task`: a module whose forward maps a `Batch` to (loss, logs), its dataset, and
what to write at the end. All randomness of a step (noise, timesteps, caption dropout) is drawn through
the `Batch` from a generator seeded by (seed, step) for the whole global batch, and the data order is a
function of the step (`StepBatches`), so a resumed run and N processes reproduce one uninterrupted
single-process run: bit for bit on resume, to float rounding across process counts.

Checkpoints (`out_dir/checkpoints/step_XXXXXXXX/`): `trainable.safetensors` and `ema.safetensors` (the
trainable parameters; frozen parts are rebuilt from the recipe config), `state.pt` (step, optimizer) and
`rng_rank{r}.pt` (torch/numpy/python RNG states), both read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from sdlab.checkpoints.io import read_state_dict, write_json, write_safetensors
from sdlab.devices import resolve_device, resolve_dtype
from sdlab.train.data import StepBatches, collate

CHECKPOINTS = "checkpoints"
# config fields that may change between a run and its resumption (they do not change the result)
RESUMABLE_FIELDS = frozenset(
    {"steps", "checkpoint_every", "keep_checkpoints", "sample_every", "log_every", "num_workers", "progress"}
)


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation and bookkeeping shared by every recipe. `batch_size` is global (split over ranks)."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    ema_decay: float = 0.0  # 0 = no EMA; the exported weights are the EMA ones otherwise
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 0  # 0 = no sample grids
    log_every: int = 10
    num_workers: int = 0
    device: str = "auto"  # auto = the local CUDA device under torchrun, else CUDA, MPS or the CPU
    # fp16/bf16: autocast with float32 master weights (fp16 with a gradient scaler); auto: sdlab.devices'
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "fp32"
    progress: bool = True

    def lr_at(self, step: int) -> float:
        """Linear warmup over `warmup_steps`, then constant or cosine decay to 0 at `steps`."""
        warm = min(1.0, (step + 1) / max(1, self.warmup_steps))
        if self.lr_schedule == "constant" or step < self.warmup_steps:
            return self.lr * warm
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------
# processes


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 when run alone) and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_ranks(device: str = "auto") -> Ranks:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Ranks(dist.get_rank() if world > 1 else 0, world, dev)


def shutdown_ranks() -> None:
    """Leave the process group, if any (call once at the end of a torchrun command)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class _GatherRows(torch.autograd.Function):
    """All ranks' rows concatenated; the backward sums every rank's gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rows]


class Batch:
    """This rank's rows of one global batch, and per-step randomness drawn for the whole global batch."""

    def __init__(self, data: dict[str, Any], step: int, seed: int, ranks: Ranks, global_size: int) -> None:
        self.data = {k: v.to(ranks.device) if isinstance(v, Tensor) else v for k, v in data.items()}
        self.step, self.ranks, self.global_size = step, ranks, global_size
        local = global_size // ranks.world
        self.rows = slice(ranks.rank * local, (ranks.rank + 1) * local)
        self._generator = torch.Generator().manual_seed(seed * 1_000_003 + step)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def randn(self, *shape: int) -> Tensor:
        """Standard normal (local rows, *shape): the same numbers whatever the number of ranks."""
        return self._draw(torch.randn, shape)

    def rand(self, *shape: int) -> Tensor:
        """Uniform [0, 1) (local rows, *shape)."""
        return self._draw(torch.rand, shape)

    def randint(self, high: int) -> Tensor:
        """Integers in [0, high), one per local row."""
        x = torch.randint(high, (self.global_size,), generator=self._generator)
        return x[self.rows].to(self.ranks.device)

    def _draw(self, fn: Callable[..., Tensor], shape: tuple[int, ...]) -> Tensor:
        x = fn((self.global_size, *shape), generator=self._generator)
        return x[self.rows].to(self.ranks.device)

    def gather(self, x: Tensor) -> Tensor:
        """Every rank's rows of x in global order, gradients flowing back to each rank's own rows."""
        return _GatherRows.apply(x) if self.ranks.world > 1 else x


# ---------------------------------------------------------------------------------------------
# the task a recipe builds

Loss = tuple[Tensor, dict[str, Tensor | float]]


@dataclass
class Task:
    """A recipe's part: `module(batch) -> (loss, logs)` holding every trainable parameter (frozen parts
    have requires_grad False), its dataset, and `export(path)` writing the result with the final (EMA)
    weights in place; `sample(path)` writes a sample grid during training."""

    module: nn.Module
    dataset: torch.utils.data.Dataset
    export: Callable[[Path], Path]
    sample: Callable[[Path], None] | None = None


class EMA:
    """Exponential moving average of the trainable parameters, with decay warm-up min(d, (1+n)/(10+n))."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = {n: p.detach().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach(), 1 - d)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model for the duration (the training weights are put back exactly)."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        _copy_into(self.params, self.shadow)
        try:
            yield
        finally:
            _copy_into(self.params, saved)


@torch.no_grad()
def _copy_into(params: dict[str, nn.Parameter], values: dict[str, Tensor]) -> None:
    for n, p in params.items():
        p.copy_(values[n])


# ---------------------------------------------------------------------------------------------
# checkpoints


def checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = out_dir / CHECKPOINTS
    found = [(int(p.name.removeprefix("step_")), p) for p in root.glob("step_*") if p.name[5:].isdigit()]
    return sorted(found)


def rng_state() -> dict[str, Any]:
    """torch/numpy/python (and CUDA) RNG states as tensors and plain values (loadable weights_only)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python (model initialisation is then the same on every rank)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@dataclass
class RunState:
    """What a run changes — trainable parameters, optimizer, EMA — and its checkpoints under
    `out_dir/checkpoints` (the last `keep` are kept)."""

    out_dir: Path
    params: dict[str, nn.Parameter]
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # disabled (a pass-through) unless the run is in float16
    ema: EMA | None
    ranks: Ranks
    keep: int

    def save(self, step: int) -> None:
        final = self.out_dir / CHECKPOINTS / f"step_{step:08d}"
        partial = final.with_name(final.name + ".partial")
        if self.ranks.main:
            shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted save
            partial.mkdir(parents=True)
        self.ranks.barrier()
        torch.save(rng_state(), partial / f"rng_rank{self.ranks.rank}.pt")
        if self.ranks.main:
            write_safetensors(
                {n: p.detach() for n, p in self.params.items()}, partial / "trainable.safetensors"
            )
            if self.ema is not None:
                write_safetensors(self.ema.shadow, partial / "ema.safetensors")
            state = {"step": step, "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict()}
            torch.save(state, partial / "state.pt")
        self.ranks.barrier()
        if self.ranks.main:
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            for _, old in checkpoints(self.out_dir)[: -self.keep]:
                shutil.rmtree(old)
        self.ranks.barrier()

    def load(self, path: Path) -> int:
        weights = read_state_dict(path / "trainable.safetensors")
        _copy_into(self.params, {n: weights[n] for n in self.params})
        if self.ema is not None:
            self.ema.shadow = {
                n: t.to(self.ranks.device) for n, t in read_state_dict(path / "ema.safetensors").items()
            }
        state = torch.load(path / "state.pt", weights_only=True, map_location=self.ranks.device)
        self.opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # absent before float16 training, empty when it is off
            self.scaler.load_state_dict(state["scaler"])
        rng = path / f"rng_rank{self.ranks.rank}.pt"
        if rng.is_file():  # absent when resuming with more processes than the run had
            set_rng_state(torch.load(rng, weights_only=True))
        return int(state["step"])


# ---------------------------------------------------------------------------------------------
# the loop


def run(
    build: Callable[[Ranks], Task],
    config: Any,
    loop: LoopConfig,
    out_dir: str | Path,
    artefact: str,
    resume: bool = True,
) -> Path:
    """Train the task `build` makes until `loop.steps`, then write `out_dir/artefact`; returns its path.

    With `resume`, a finished run (artefact present, last checkpoint at or past `loop.steps`) returns at
    once, and an unfinished one continues from its last checkpoint; raising `loop.steps` continues a
    finished run and replaces its artefact.
    """
    out_dir = Path(out_dir)
    ranks = setup_ranks(loop.device)
    target, done = out_dir / artefact, checkpoints(out_dir)
    if resume and target.is_file() and done and done[-1][0] >= loop.steps:
        return target
    if not resume and (done or target.exists()):
        raise FileExistsError(f"{out_dir}: holds a previous run; resume it or choose another output folder")
    seed_everything(loop.seed)
    task = build(ranks)  # checks the data before anything is written
    _record_config(out_dir, config, ranks, bool(done))
    module = task.module.to(ranks.device)
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the task has no trainable parameters")
    opt = torch.optim.AdamW(params.values(), lr=loop.lr, betas=loop.betas, weight_decay=loop.weight_decay)
    scaler = torch.amp.GradScaler(ranks.device.type, enabled=autocast_dtype(loop, ranks) == torch.float16)
    ema = EMA(params, loop.ema_decay) if loop.ema_decay else None
    state = RunState(out_dir, params, opt, scaler, ema, ranks, loop.keep_checkpoints)
    start = state.load(done[-1][1]) if resume and done else 0
    _train(task, module, state, loop, start)
    if ranks.main:
        with ema.applied() if ema else contextlib.nullcontext():
            target.unlink(missing_ok=True)  # a continued run replaces its own earlier result
            task.export(target)
    ranks.barrier()
    return target


def _record_config(out_dir: Path, config: Any, ranks: Ranks, resuming: bool) -> None:
    """Write config.json for a fresh run; refuse to resume a run made with a different recipe config."""
    now = json.loads(json.dumps(dataclasses.asdict(config)))
    path = out_dir / "config.json"
    if resuming and path.is_file():
        a, b = _flat(now), _flat(json.loads(path.read_text()))
        changed = [
            k
            for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k.rsplit(".", 1)[-1] not in RESUMABLE_FIELDS
        ]
        if changed:
            raise ValueError(
                f"{out_dir}: was trained with a different config ({', '.join(changed[:5])}); "
                "resume with the same settings or choose another output folder"
            )
    elif ranks.main:
        path.unlink(missing_ok=True)  # from a run that stopped before its first checkpoint
        write_json(now, path)
    ranks.barrier()


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def _train(task: Task, module: nn.Module, state: RunState, loop: LoopConfig, start: int) -> None:
    """Steps start … loop.steps − 1, checkpointing, logging and sampling on the way."""
    params, opt, ema, ranks, out_dir = state.params, state.opt, state.ema, state.ranks, state.out_dir
    dtype, scaler = autocast_dtype(loop, ranks), state.scaler
    model = _wrap(module, ranks)
    sampler = StepBatches(
        len(task.dataset), loop.batch_size, loop.seed, start, loop.steps, ranks.rank, ranks.world
    )
    loader = torch.utils.data.DataLoader(
        task.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=loop.num_workers
    )
    log = _Log(out_dir, loop, ranks, start)
    for step, data in zip(range(start, loop.steps), loader, strict=True):
        for group in opt.param_groups:
            group["lr"] = loop.lr_at(step)
        with torch.autocast(ranks.device.type, dtype, enabled=dtype != torch.float32):
            loss, logs = model(Batch(data, step, loop.seed, ranks, loop.batch_size))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # the true gradients, for clipping and the overflow check
        if loop.grad_clip:
            logs["grad_norm"] = nn.utils.clip_grad_norm_(params.values(), loop.grad_clip)
        scaler.step(opt)  # skipped when a float16 gradient overflowed (the scale is then lowered)
        scaler.update()
        if ema is not None:
            ema.update(step)
        done = step + 1
        log.step(done, loss.detach(), logs, opt.param_groups[0]["lr"])
        if (loop.checkpoint_every and done % loop.checkpoint_every == 0) or done == loop.steps:
            state.save(done)
        if task.sample and loop.sample_every and done % loop.sample_every == 0 and ranks.main:
            with ema.applied() if ema else contextlib.nullcontext():
                task.sample(out_dir / "samples" / f"step_{done:08d}.png")
    log.close()


def autocast_dtype(loop: LoopConfig, ranks: Ranks) -> torch.dtype:
    """The dtype the forward pass autocasts to (float32: no autocast); `auto` as `sdlab.devices` says."""
    return resolve_dtype(loop.precision, ranks.device)


def _wrap(module: nn.Module, ranks: Ranks) -> nn.Module:
    if ranks.world == 1:
        return module
    ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


class _Log:
    """tqdm bar (loss, lr, images/s, ETA) and `log.jsonl` lines every `log_every` steps, on rank 0."""

    def __init__(self, out_dir: Path, loop: LoopConfig, ranks: Ranks, start: int) -> None:
        self.loop, self.main, self.path = loop, ranks.main, out_dir / "log.jsonl"
        self.bar = tqdm(
            total=loop.steps,
            initial=start,
            disable=not (loop.progress and ranks.main),
            unit="step",
            dynamic_ncols=True,
        )
        self.sums: dict[str, float] = {}
        self.count, self.t0, self.since = 0, time.perf_counter(), start

    def step(self, done: int, loss: Tensor, logs: dict[str, Tensor | float], lr: float) -> None:
        self.bar.update(1)
        for k, v in {"loss": loss, **logs}.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        if done % self.loop.log_every and done != self.loop.steps:
            return
        elapsed = time.perf_counter() - self.t0
        record = {"step": done, "lr": lr, **{k: v / self.count for k, v in self.sums.items()}}
        record["images_per_s"] = (done - self.since) * self.loop.batch_size / max(elapsed, 1e-9)
        self.bar.set_postfix(
            loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_s']:.1f}"
        )
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.sums, self.count, self.t0, self.since = {}, 0, time.perf_counter(), done

    def close(self) -> None:
        self.bar.close()
