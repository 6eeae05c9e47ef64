"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting
Cluster Assignments").

"we compute a code from an augmented version of the image and predict this code from other
augmented versions of the same image" (Sec. 3.1): features are scored against learnable
prototypes, the scores of the global crops are turned into equipartitioned soft codes by
Sinkhorn-Knopp, and every other crop predicts them (the "swapped" prediction). Multi-crop
adds cheap low-resolution crops that only predict.

Follows the official PyTorch code (facebookresearch/swav, ``main_swav.py``), which differs
from the paper in a few details and reproduced its numbers:

- the prototypes are re-normalised at the start of each step rather than after the update,
  and receive no update at all (``grad = None``) for the first 313 iterations;
- the loss is averaged over the crops used for assignment and, for each, over the V-1
  other crops;
- the projection head's BatchNorm sees all crops of a step together (the backbone runs once
  per resolution, the head once on everything);
- LARS (LARC) without exclusions: BatchNorm parameters and biases are adapted and decayed
  like the weights;
- the queue (small batches only) holds the last ``queue_length`` features of each crop used
  for assignment, starts at ``epoch_queue_starts``, is prefixed to the batch for
  Sinkhorn-Knopp only once full, and its length is rounded down to a multiple of the
  global batch (so the 3840-long queue of the batch-256 recipe vanishes at batch 4096).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from sslcli.backbones import Backbone, feature_dim
from sslcli.data.views import ViewSpec, local_crop_size, swav_views
from sslcli.method import Batch, Method, MethodConfig, Recipe, StepInfo, StepOutput
from sslcli.nn import MLP, dist, multicrop_forward, patch_size, sinkhorn_knopp

# -- the loss ---------------------------------------------------------------------------------


def swapped_prediction_loss(
    scores: list[Tensor], codes: dict[int, Tensor], temperature: float
) -> Tensor:
    """SwAV's multi-crop swapped-prediction loss.

    "ℓ(z_t, q_s) = −Σ_k q_s^(k) log p_t^(k), where p_t^(k) = exp(z_tᵀc_k/τ) /
    Σ_k' exp(z_tᵀc_k'/τ)" (Caron et al. 2020, Eq. 2), with multi-crop: "we compute codes
    using only the full resolution crops ... L(z_t1, ..., z_t(V+2)) = Σ_{i∈{1,2}}
    Σ_{v≠i} ℓ(z_tv, q_ti)" (Eq. 4). Normalised as in the official code: each term is a
    batch mean, the terms of one code are divided by V−1 (V = all crops), and the result
    is averaged over the codes.

    ``scores``: per crop, ``z·Cᵀ`` [B, K] (before the temperature); ``codes``: crop index →
    its Sinkhorn codes [B, K] (rows sum to 1, no gradient). Precision: fp32, autocast off.
    """
    n_crops = len(scores)
    if n_crops < 2:
        raise ValueError("the swapped prediction needs at least two crops")
    with torch.autocast(device_type=scores[0].device.type, enabled=False):
        total = scores[0].new_zeros((), dtype=torch.float32)
        for s, q in codes.items():
            sub = total.new_zeros(())
            for v in range(n_crops):
                if v == s:
                    continue
                log_p = F.log_softmax(scores[v].float() / temperature, dim=1)
                sub = sub - (q.float() * log_p).sum(dim=1).mean()
            total = total + sub / (n_crops - 1)
        return total / len(codes)


def prototype_scores(z: Tensor, prototypes: Tensor) -> Tensor:
    """``z·Cᵀ`` in fp32 with autocast off, for the batch's crops and the queue alike.

    The scores feed ``exp(·/ε)`` at ε = 0.05 (Sinkhorn) and a softmax at τ = 0.1; bf16's
    8-bit mantissa would move a score of 1/ε = 20 by up to 0.08. The official code
    computes the codes in fp32 too.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        return z.float() @ prototypes.float().T


def swav_loss(
    z: Tensor,
    prototypes: Tensor,
    batch: int,
    crops_for_assign: Sequence[int],
    temperature: float,
    epsilon: float,
    iterations: int,
    queues: Sequence[Tensor] | None = None,
) -> Tensor:
    """SwAV's loss from the unit features ``z`` [V*B, d] of all crops (crop-major) and the
    prototypes C [K, d]: the codes of each crop in ``crops_for_assign`` by Sinkhorn (with
    ``queues[i]``'s past features prefixed to the scores of the i-th of them), then the
    swapped prediction. Precision: fp32 throughout (scores, Sinkhorn and loss)."""
    scores = list(prototype_scores(z, prototypes).split(batch))
    codes: dict[int, Tensor] = {}
    with torch.no_grad():
        for i, crop in enumerate(crops_for_assign):
            s = scores[crop].detach()
            if queues is not None:
                s = torch.cat([prototype_scores(queues[i], prototypes), s])
            codes[crop] = sinkhorn_knopp(s, epsilon, iterations)[-batch:]
    return swapped_prediction_loss(scores, codes, temperature)


def queue_in_use(step: int, start_step: int, queue_rows: int, global_batch: int) -> bool:
    """Whether the queue is prefixed to the scores at ``step`` (a pure function of it).

    The official code creates an empty queue at ``epoch_queue_starts``, fills it with each
    step's features after computing the scores, and uses it from the first step at which
    its last row is no longer zero, i.e. once it is full: ``queue_rows / global_batch``
    steps after the start.
    """
    if queue_rows <= 0 or step < start_step:
        return False
    return step - start_step >= queue_rows // global_batch


def effective_queue_rows(queue_length: int, global_batch: int) -> int:
    """The official rounding: "the queue needs to be divisible by the batch size"."""
    return queue_length - queue_length % global_batch


# -- configuration ----------------------------------------------------------------------------


class SwAVConfig(MethodConfig):
    temperature: float = Field(
        0.1, gt=0, description="Softmax temperature τ of the swapped prediction (0.1)."
    )
    epsilon: float = Field(
        0.05,
        gt=0,
        description=(
            "Sinkhorn entropy regularisation ε (0.05). Lower it (0.03) if the codes are too "
            "uniform and the loss stalls; raise it if the loss becomes unstable."
        ),
    )
    sinkhorn_iterations: int = Field(
        3, ge=1, description="Sinkhorn-Knopp iterations (3 is enough in the paper's study)."
    )
    proj_hidden_dim: int = Field(
        2048, ge=1, description="Projection hidden width (2048; 2048 x width for wide ResNets)."
    )
    proj_dim: int = Field(128, ge=1, description="Feature width d = prototype width (128).")
    num_prototypes: int = Field(
        3000,
        ge=2,
        description=(
            "Number of prototypes K: 3000 for ImageNet; about 10x the number of classes is "
            "a good rule on smaller data."
        ),
    )
    num_global_crops: int = Field(
        2, ge=1, description="Full-resolution crops (trainer image size); 2 in every recipe."
    )
    global_crops_scale: tuple[float, float] = Field(
        (0.14, 1.0), description="Area range of the full-resolution crops."
    )
    local_crops_number: int = Field(
        6, ge=0, description="Low-resolution crops (multi-crop): 6; 0 disables multi-crop."
    )
    local_crops_scale: tuple[float, float] = Field(
        (0.05, 0.14), description="Area range of the low-resolution crops."
    )
    local_crops_size: int | None = Field(
        None,
        ge=1,
        description=(
            "Side of the low-resolution crops; default 96/224 of the image size (96 at 224, "
            "14 at 32), rounded to a multiple of a ViT's patch."
        ),
    )
    blur_p: float = Field(
        0.5, ge=0, le=1, description="Gaussian-blur probability of every crop (0.5)."
    )
    crops_for_assign: list[int] = Field(
        default_factory=lambda: [0, 1],
        description="Crops whose codes are predicted by the others: the two global crops.",
    )
    freeze_prototypes_iters: int = Field(
        313,
        ge=0,
        description=(
            "Iterations during which the prototypes are not updated: about one epoch "
            "(313 at batch 4096 on ImageNet, 5005 at batch 256)."
        ),
    )
    queue_length: int = Field(
        0,
        ge=0,
        description=(
            "Features queued per assigned crop for Sinkhorn (0 = none). Use with small "
            "batches (3840 at batch 256, i.e. 15 batches); rounded down to a multiple of the "
            "global batch."
        ),
    )
    epoch_queue_starts: int = Field(
        15, ge=0, description="Epoch at which the queue starts filling (15)."
    )
    collapse_tolerance: float = Field(
        0.01,
        ge=0,
        description="A step counts as 'at ln K' (collapse) when |loss - ln K| <= this value.",
    )
    collapse_patience: int | None = Field(
        None,
        ge=1,
        description=(
            "Consecutive steps at ln K, after the prototypes are released, before a "
            "collapse warning; default one epoch."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> SwAVConfig:
        for name in ("global_crops_scale", "local_crops_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got ({lo}, {hi})")
        n = self.num_global_crops + self.local_crops_number
        if n < 2:
            raise ValueError("SwAV needs at least two crops in all")
        if not self.crops_for_assign:
            raise ValueError("crops_for_assign must name at least one crop")
        if len(set(self.crops_for_assign)) != len(self.crops_for_assign):
            raise ValueError(f"crops_for_assign has repeated crops: {self.crops_for_assign}")
        bad = [c for c in self.crops_for_assign if not 0 <= c < n]
        if bad:
            raise ValueError(f"crops_for_assign {bad} out of range for {n} crops (0..{n - 1})")
        return self


# -- the method -------------------------------------------------------------------------------


class SwAV(Method):
    """SwAV: online clustering with Sinkhorn codes and swapped prediction across crops."""

    name = "swav"
    # Official code (facebookresearch/swav, src/resnet50.py): zero_init_residual=False,
    # and main_swav.py does not change it (γ = 1).
    zero_init_last = False
    Config = SwAVConfig
    # Official batch-4096 recipe: LARS lr 4.8 (= 0.3 x 4096/256), cosine to 4.8e-3 after 10
    # warm-up epochs, weight decay 1e-6 on every parameter (LARC excludes nothing).
    recipe = Recipe(
        optim={
            "name": "lars",
            "lr": 0.3,
            "lr_scaling": "linear",
            "weight_decay": 1e-6,
            "momentum": 0.9,
            "exclude_norm_bias": False,
        },
        schedule={"kind": "cosine", "warmup_epochs": 10, "final_lr_fraction": 0.001},
    )

    queue: Tensor
    collapse_run: Tensor

    def __init__(self, config: SwAVConfig, backbone: Backbone, dataset_size: int = 0) -> None:
        super().__init__(config, backbone, dataset_size)
        self.config: SwAVConfig = config
        c = config
        # Linear(D, 2048) -> BN -> ReLU -> Linear(2048, 128), biases as in the official head.
        self.projector = MLP([feature_dim(backbone), c.proj_hidden_dim, c.proj_dim], bias=True)
        self.prototypes = nn.Linear(c.proj_dim, c.num_prototypes, bias=False)
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        if c.queue_length > 0:
            # One global queue, identical on every process (features are all-gathered), so
            # the checkpoint holds all of it; each process uses the rows it contributed.
            # Newest features first, as in the official code.
            self.register_buffer(
                "queue", torch.zeros(len(c.crops_for_assign), c.queue_length, c.proj_dim)
            )
        self.register_buffer("collapse_run", torch.zeros((), dtype=torch.long))
        self._warned_queue = False
        self._warned_collapse = False

    # -- views --------------------------------------------------------------------------------
    def views(self) -> list[ViewSpec]:
        c = self.config
        size = self.backbone.sslcli_spec.image_size
        local = c.local_crops_size or local_crop_size(size, patch_size(self.backbone))
        return swav_views(
            size,
            local,
            global_count=c.num_global_crops,
            global_scale=c.global_crops_scale,
            local_count=c.local_crops_number,
            local_scale=c.local_crops_scale,
            blur_p=c.blur_p,
        )

    # -- one step -----------------------------------------------------------------------------
    def training_step(self, batch: Batch, step: StepInfo) -> StepOutput:
        c = self.config
        # "normalize the prototypes" before the forward pass, as the official loop does.
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        feats = multicrop_forward(self.backbone, batch.views)
        z = F.normalize(self.projector(feats), dim=1)  # [V*B, d]
        b = batch.views[0].shape[0]
        queues = None
        if self._queue_active(step, b):
            queues = [self._local_queue(i, b) for i in range(len(c.crops_for_assign))]
        loss = swav_loss(
            z, self.prototypes.weight, b, c.crops_for_assign, c.temperature, c.epsilon,
            c.sinkhorn_iterations, queues,
        )  # fmt: skip
        use_queue = queues is not None
        # After the codes: this step's features join the queue for the next steps.
        if self._queue_filling(step):
            with torch.no_grad():
                emb = z.detach().float().split(b)
                self._enqueue([emb[crop] for crop in c.crops_for_assign], b)
        logs: dict[str, Tensor | float] = {"queue_used": float(use_queue)}
        logs.update(self._collapse_check(loss, step))
        return StepOutput(loss=loss, logs=logs, embedding=z[:b].detach())

    def before_optimizer_step(self, step: StepInfo) -> None:
        # "cancel gradients for the prototypes": no update at all while frozen (a zero
        # gradient would still let LARS apply weight decay and fill its momentum buffer).
        if step.step < self.config.freeze_prototypes_iters:
            self.prototypes.weight.grad = None

    # -- the queue ----------------------------------------------------------------------------
    def _queue_rows(self, local_batch: int) -> int:
        if self.config.queue_length == 0:
            return 0
        g = local_batch * dist.world_size()
        rows = effective_queue_rows(self.config.queue_length, g)
        if rows != self.config.queue_length and not self._warned_queue:
            self._warned_queue = True
            warnings.warn(
                f"swav: method.queue_length {self.config.queue_length} is not a multiple of "
                f"the global batch {g}; using {rows} rows" + (" (no queue)" if rows == 0 else ""),
                stacklevel=3,
            )
        return rows

    def _queue_start(self, step: StepInfo) -> int:
        return self.config.epoch_queue_starts * step.steps_per_epoch

    def _queue_filling(self, step: StepInfo) -> bool:
        return self.config.queue_length > 0 and step.step >= self._queue_start(step)

    def _queue_active(self, step: StepInfo, local_batch: int) -> bool:
        rows = self._queue_rows(local_batch)
        g = local_batch * dist.world_size()
        return queue_in_use(step.step, self._queue_start(step), rows, g)

    def _local_queue(self, i: int, local_batch: int) -> Tensor:
        """This process's rows of queue ``i``: the features it enqueued itself, newest first.

        Each enqueue writes one gathered global batch (rank-major), so the queue is a
        sequence of blocks [world, local_batch]; this process's part of every block is the
        per-process queue of the official code.
        """
        world = dist.world_size()
        rows = self._queue_rows(local_batch)
        q = self.queue[i, :rows]
        if world == 1:
            return q
        blocks = q.view(rows // (world * local_batch), world, local_batch, -1)
        return blocks[:, dist.rank()].reshape(-1, q.shape[-1])

    @torch.no_grad()
    def _enqueue(self, feats: list[Tensor], local_batch: int) -> None:
        """Shift the queue by one global batch and write the newest features at its front."""
        rows = self._queue_rows(local_batch)
        if rows == 0:
            return
        for i, f in enumerate(feats):
            new = dist.gather(f.to(self.queue.dtype))  # [global batch, d], rank-major
            g = new.shape[0]
            q = self.queue[i, :rows]
            q[g:] = q[:-g].clone()
            q[:g] = new

    # -- collapse -----------------------------------------------------------------------------
    def _collapse_check(self, loss: Tensor, step: StepInfo) -> dict[str, Tensor | float]:
        """Count consecutive steps whose loss sits at ln K (collapse) without a host sync.

        With every feature equal, equipartition forces uniform codes and the best
        prediction is uniform: the loss settles at exactly ln K (8.006 for 3000 prototypes).
        Early in training the loss is typically *above* ln K (predictions not yet matched
        to the codes), so only a loss sitting at ln K counts. The counter is a buffer
        (resume keeps it); it is read once per epoch to warn.
        """
        c = self.config
        at = ((loss.detach() - math.log(c.num_prototypes)).abs() <= c.collapse_tolerance).long()
        counting = step.step >= c.freeze_prototypes_iters
        with torch.no_grad():
            self.collapse_run.copy_((self.collapse_run + 1) * at if counting else at * 0)
        patience = c.collapse_patience or step.steps_per_epoch
        if (step.step + 1) % step.steps_per_epoch == 0 and not self._warned_collapse:
            run = int(self.collapse_run)
            if run >= patience:
                self._warned_collapse = True
                warnings.warn(
                    f"swav: the loss has stayed at ln({c.num_prototypes}) = "
                    f"{math.log(c.num_prototypes):.3f} for {run} steps: the representation "
                    "has probably collapsed; try a lower method.epsilon, a longer "
                    "method.freeze_prototypes_iters, a lower learning rate or a queue",
                    stacklevel=3,
                )
        return {"at_ln_k": at.float(), "collapse": (self.collapse_run >= patience).float()}
