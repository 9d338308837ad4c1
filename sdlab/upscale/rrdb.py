"""ESRGAN's RRDBNet (Wang et al. 2018, "ESRGAN"), in Real-ESRGAN's key layout.

Files come in three layouts, all mapped onto the new one by `to_new_layout`:
new (Real-ESRGAN/BasicSR: `conv_first`, `body.N.rdbK.convJ`, `conv_body`, `conv_upM`, `conv_hr`,
`conv_last`), BSRGAN's (`RRDB_trunk`, `trunk_conv`, `upconvM`, `HRconv`) and the original ESRGAN
`nn.Sequential` one (`model.0`, `model.1.sub.N.RDBK.convJ.0`, ..., `model.{3M+4}`).
Real-ESRGAN's 1× and 2× models pixel-unshuffle the input by 4 or 2 and run a 4× network on it;
that shows as `conv_first` taking 16 or 4 times the channels `conv_last` gives out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.checkpoints.io import CheckpointError
from sdlab.upscale.base import StateDict, Upscaler, indices, need, pad_to_multiple, upsample2

_BSRGAN = (
    (re.compile(r"RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\."), r"body.\1.rdb\2.conv\3."),
    (re.compile(r"trunk_conv\."), "conv_body."),
    (re.compile(r"upconv(\d)\."), r"conv_up\1."),
    (re.compile(r"HRconv\."), "conv_hr."),
)
_OLD_RDB = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.")


def is_rrdb(sd: StateDict) -> bool:
    """Whether the keys are an RRDBNet's, in any of the three layouts (ESRGAN+, with extra 1×1 paths in
    its dense blocks, is not: spandrel runs it)."""
    layout = any(k in sd for k in ("body.0.rdb1.conv1.weight", "RRDB_trunk.0.RDB1.conv1.weight")) or (
        "model.0.weight" in sd and "model.1.sub.0.RDB1.conv1.0.weight" in sd
    )
    return layout and not any(".conv1x1." in k for k in sd)


def to_new_layout(sd: StateDict) -> StateDict:
    """The state dict in the new key layout (a pure renaming; new-layout files pass through)."""
    if "model.0.weight" in sd:
        return _from_sequential(sd)
    out = {}
    for key, value in sd.items():
        for rx, new in _BSRGAN:
            key = rx.sub(new, key) if rx.match(key) else key
        out[key] = value
    return out


def _from_sequential(sd: StateDict) -> StateDict:
    """Original ESRGAN: model.0 conv, model.1 shortcut over the RRDBs and the trunk conv, then per ×2 stage
    (upsample, conv, act) at model.{3M-1..3M+1}, then hr conv, act and last conv."""
    nb = max(indices(sd, r"model\.1\.sub\.(\d+)\."))  # the trunk conv follows the nb RRDBs
    last = max(indices(sd, r"model\.(\d+)\.weight"))
    stages, rest = divmod(last - 4, 3)
    if rest or stages < 0:
        raise CheckpointError(f"ESRGAN layout: last layer model.{last} fits no upsampling stage count")
    names = {"model.0": "conv_first", f"model.1.sub.{nb}": "conv_body"}
    names |= {f"model.{3 * m}": f"conv_up{m}" for m in range(1, stages + 1)}
    names |= {f"model.{3 * stages + 2}": "conv_hr", f"model.{3 * stages + 4}": "conv_last"}
    out = {}
    for key, value in sd.items():
        prefix, _, kind = key.rpartition(".")
        if prefix in names:
            out[f"{names[prefix]}.{kind}"] = value
        elif m := _OLD_RDB.match(key):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{kind}"] = value
        else:
            out[key] = value  # left for strict loading to name
    return out


@dataclass(frozen=True)
class RRDBConfig:
    """RRDBNet hyper-parameters, all read from shapes (`detect_rrdb`)."""

    in_nc: int = 3  # channels into conv_first (×4 or ×16 after pixel-unshuffle)
    out_nc: int = 3
    nf: int = 64  # feature channels
    gc: int = 32  # growth channels of each dense block
    nb: int = 23  # RRDB blocks
    stages: int = 2  # nearest ×2 + conv stages
    unshuffle: int = 1  # pixel-unshuffle factor applied to the input first (1, 2 or 4)

    @property
    def scale(self) -> int:
        return 2**self.stages // self.unshuffle


def detect_rrdb(sd: StateDict) -> RRDBConfig:
    """RRDBNet configuration of a new-layout state dict, from its keys and shapes."""
    what = "RRDBNet (ESRGAN)"
    first, last = need(sd, "conv_first.weight", what), need(sd, "conv_last.weight", what)
    in_nc, out_nc = first.shape[1], last.shape[0]
    unshuffle = {1: 1, 4: 2, 16: 4}.get(in_nc // out_nc if in_nc % out_nc == 0 else 0)
    if unshuffle is None:
        raise CheckpointError(f"{what}: {in_nc} input channels for {out_nc} output channels fit no unshuffle")
    stages = len(indices(sd, r"conv_up(\d+)\.weight"))
    if 2**stages < unshuffle:
        raise CheckpointError(
            f"{what}: {stages} upsampling stages cannot undo a {unshuffle}x pixel-unshuffle"
        )
    return RRDBConfig(
        in_nc=in_nc,
        out_nc=out_nc,
        nf=first.shape[0],
        gc=need(sd, "body.0.rdb1.conv1.weight", what).shape[0],
        nb=len(indices(sd, r"body\.(\d+)\.")),
        stages=stages,
        unshuffle=unshuffle,
    )


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.2)


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3×3 convs; the output is scaled by 0.2 and added to the input."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.conv4 = (_conv(nf + i * gc, gc) for i in range(4))
        self.conv5 = _conv(nf + 4 * gc, nf)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(_lrelu(conv(torch.cat(feats, 1))))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks, scaled by 0.2 around a skip."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (ResidualDenseBlock(nf, gc) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(Upscaler):
    """ESRGAN / Real-ESRGAN generator; attribute names are the new-layout checkpoint keys."""

    architecture = "ESRGAN"

    def __init__(self, cfg: RRDBConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scale, self.multiple = cfg.scale, cfg.unshuffle
        self.in_channels = cfg.in_nc // cfg.unshuffle**2
        self.conv_first = _conv(cfg.in_nc, cfg.nf)
        self.body = nn.Sequential(*(RRDB(cfg.nf, cfg.gc) for _ in range(cfg.nb)))
        self.conv_body = _conv(cfg.nf, cfg.nf)
        for m in range(1, cfg.stages + 1):
            setattr(self, f"conv_up{m}", _conv(cfg.nf, cfg.nf))
        self.conv_hr = _conv(cfg.nf, cfg.nf)
        self.conv_last = _conv(cfg.nf, cfg.out_nc)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if self.cfg.unshuffle > 1:
            x = F.pixel_unshuffle(pad_to_multiple(x, self.cfg.unshuffle), self.cfg.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for m in range(1, self.cfg.stages + 1):
            feat = _lrelu(getattr(self, f"conv_up{m}")(upsample2(feat)))
        out = self.conv_last(_lrelu(self.conv_hr(feat)))
        return out[..., : h * self.scale, : w * self.scale]
