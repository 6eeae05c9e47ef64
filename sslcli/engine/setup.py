"""Setting a run up: the process group, the run directory, the training data and the model.

Each function does one part of :class:`sslcli.engine.trainer.Trainer`'s set-up; the
trainer calls them in an order that matters (every RNG draw of building the model comes
after ``seed_everything(seed + rank)``, so a resumed run builds the same model).
A dry run (``ssl train --dry-run``) goes through the same functions and skips only what
acts on the world: joining a process group, caching data on the device, the JPEG decoder,
compiling and DDP wrapping.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sslcli import contract, registry
from sslcli.backbones import BackboneSpec, feature_dim, make_spec
from sslcli.config import RunConfig, save_json
from sslcli.data.cache import maybe_cache
from sslcli.data.datasets import open_dataset
from sslcli.data.gpu_decode import JpegDecoder, use_gpu_decode
from sslcli.data.images import ImageDataset
from sslcli.engine.batches import num_workers
from sslcli.engine.dryrun import DryRun
from sslcli.engine.resume import run_dir_of
from sslcli.errors import ConfigError
from sslcli.method import Method, MethodConfig, RunContext
from sslcli.nn import dist
from sslcli.runs import metrics
from sslcli.runs.layout import default_run_dir


# -- processes and the run directory ----------------------------------------------------------
def init_distributed(device: str) -> bool:
    """Join the process group torchrun describes in the environment; True if we did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_dist():
        return False
    import torch.distributed as tdist

    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def leave_distributed() -> None:
    if dist.is_dist():
        import torch.distributed as tdist

        tdist.destroy_process_group()


def pick_run_dir(
    run: RunConfig, resume_path: Path | None, resume_meta: dict[str, Any] | None
) -> Path:
    """Where the run writes (the same on every process)."""
    out = run.trainer.out
    run_dir: Path
    if resume_path is not None and resume_meta is not None:
        saved_out = resume_meta.get("config", {}).get("trainer", {}).get("out")
        # Resuming continues the run where its checkpoint lies (even if the directory
        # was moved since); an explicitly different --out forks it into a new one.
        run_dir = run_dir_of(resume_path) if out in (None, saved_out) else Path(out)
    else:
        run_dir = Path(out) if out else default_run_dir(run.method)
    # A timestamped default name could differ by a second between processes.
    return Path(dist.broadcast_object(str(run_dir)))


def continues_in_place(resume_path: Path | None, run_dir: Path) -> bool:
    """Whether a run continues its checkpoint's own run directory."""
    if resume_path is None:
        return False
    return run_dir_of(resume_path).resolve() == run_dir.resolve()


def write_run_files(
    run: RunConfig, method_cls: type[Method], run_dir: Path, resumed_at: int | None
) -> None:
    """The run directory's config.json (rank 0, once the directory is claimed). A run
    resumed at step ``resumed_at`` drops the log lines written after that checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = registry.info_of(method_cls).record()
    save_json(run, run_dir / "config.json", extra={"plugin": record})
    if resumed_at is not None:
        metrics.truncate_after(run_dir / metrics.FILE, resumed_at)


# -- data --------------------------------------------------------------------------------------
def open_train_data(
    run: RunConfig, device: torch.device, dry_run: DryRun | None
) -> tuple[ImageDataset, JpegDecoder | None]:
    """The training split (cached on the device with ``data.cache=device``) and the
    nvJPEG decoder when ``data.gpu_decode`` uses one."""
    d = run.data
    load_size = d.load_size or d.image_size
    dataset: ImageDataset = (
        dry_run.nominal_dataset(load_size)
        if dry_run is not None and dry_run.images is not None
        else open_dataset(d.dataset, "train", load_size, max_bad_fraction=d.max_bad_fraction)
    )
    if d.cache == "device" and dry_run is None:
        dataset = maybe_cache(
            dataset, device=device, num_workers=num_workers(d.num_workers, dataset)
        )
    gpu_ok = use_gpu_decode(dataset, device)
    if d.gpu_decode == "on" and not gpu_ok:
        raise ConfigError(
            ["data.gpu_decode: 'on' needs a folder of JPEG files and a CUDA device with nvJPEG"]
        )
    decoder = (
        JpegDecoder(dataset, load_size, device)  # type: ignore[arg-type]
        if gpu_ok and d.gpu_decode != "off" and dry_run is None
        else None
    )
    return dataset, decoder


def local_batch(batch_size: int, world: int) -> int:
    """Each process's share of the global batch."""
    if batch_size % world:
        raise ConfigError(
            [f"trainer.batch_size: {batch_size} (the global batch) is not divisible by "
             f"{world} processes"]
        )  # fmt: skip
    return batch_size // world


# -- the model ---------------------------------------------------------------------------------
def backbone_spec(run: RunConfig, method_cls: type[Method]) -> BackboneSpec:
    """The backbone to build. The method contributes its own architecture's arguments
    (initialisation, MoCo v3's 12-head ViT-S) through the factory, so the spec records
    what was built."""
    b = run.backbone
    return make_spec(
        b.name, run.data.image_size, b.small_stem, b.drop_path_rate, b.kwargs, method=method_cls
    )


def build_method(
    run: RunConfig,
    method_cls: type[Method],
    method_config: MethodConfig,
    spec: BackboneSpec,
    dataset_size: int,
    device: torch.device,
) -> tuple[Method, MethodConfig]:
    """The method around a fresh backbone, with the options it sizes from the backbone
    and data filled in where the user stated none; returns it and its final config."""
    backbone = spec.build()
    ctx = RunContext(spec.timm_name, feature_dim(backbone), run.data.image_size, dataset_size,
                     device.type)  # fmt: skip
    method_config = contract.apply_option_defaults(method_cls, run, method_config, ctx)
    return contract.build_method(method_cls, method_config, backbone, dataset_size), method_config


def use_channels_last(setting: bool | None, spec: BackboneSpec, device: torch.device) -> bool:
    """``trainer.channels_last``, or the default for the backbone on the device."""
    if setting is not None:
        return setting
    # Grouped convs (SK-ResNeXt) are slower in channels_last; ViTs gain nothing.
    return device.type == "cuda" and not spec.is_vit and "resnext" not in spec.timm_name


def place_method(
    method: Method, run: RunConfig, device: torch.device, world: int, channels_last: bool,
    dry_run: DryRun | None,
) -> None:  # fmt: skip
    """Activation checkpointing, synchronised BN, the device and the memory format."""
    if run.trainer.grad_checkpointing:
        enable_grad_checkpointing(method, run.backbone.name)
    if world > 1 and run.trainer.sync_bn and dry_run is None:
        try:
            dist.convert_sync_batchnorm(method, device)
        except ValueError as e:
            raise ConfigError([str(e)]) from e
    method.to(device)
    if channels_last:
        method.to(memory_format=torch.channels_last)


def enable_grad_checkpointing(method: Method, backbone: str) -> None:
    """``trainer.grad_checkpointing``: timm's activation checkpointing in every encoder
    the method built from the backbone spec (CMC's second one and momentum copies too).

    The blocks' activations are recomputed in backward instead of kept, which trades
    about one extra forward for most of the activation memory; the result is the same.
    """
    encoders = [m for m in method.modules() if hasattr(m, "sslcli_spec")]
    for enc in encoders:
        setter = getattr(enc, "set_grad_checkpointing", None)
        try:
            if not callable(setter):
                raise NotImplementedError
            setter(True)
        except (NotImplementedError, AssertionError) as e:
            raise ConfigError(
                [f"trainer.grad_checkpointing: backbone {backbone!r} "
                 f"({type(enc).__name__}) does not support activation checkpointing"]
            ) from e  # fmt: skip
    if not encoders:
        raise ConfigError(
            ["trainer.grad_checkpointing: this method builds no timm encoder to checkpoint"]
        )


def wrap_ddp(method: Method, device: torch.device) -> nn.Module:
    """The DDP wrapper (it broadcasts rank 0's parameters here, never buffers later)."""
    return nn.parallel.DistributedDataParallel(
        method, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync()
    )


def no_buffer_sync() -> dict[str, bool]:
    """DDP keyword for "never broadcast buffers in forward": each process keeps its own
    BatchNorm statistics (queues and banks are kept equal by the methods themselves).
    Newer torch spells it ``forward_sync_buffers`` (``broadcast_buffers`` is deprecated);
    the trainer broadcasts the initial buffers itself either way."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
