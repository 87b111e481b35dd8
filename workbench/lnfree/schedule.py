"""The removal schedule and fine-tuning hyperparameters, with presets mirroring the paper's Tables 3-4.

The paper freezes one norm site at a time while fine-tuning: every MLP norm (layer 0 first), then every q/k
path, then every v path, then the final norm, with a fixed number of optimizer steps between removals within a
group. `RemovalSchedule` holds those numbers; `FinetuneConfig` the rest of the run (batch, learning-rate
schedule, auxiliary loss). Presets:

======================  ==========  ==========  ==========  ==========  ===========  ==========  ==========
preset                  gpt2        gpt2-medium gpt2-large  gpt2-xl     demo (CPU)   demo-quick  smoke
======================  ==========  ==========  ==========  ==========  ===========  ==========  ==========
micro-batch x accum     32 x 16     22 x 23     28 x 18     18 x 28     16 x 1       8 x 1       4 x 1
sequence length         1024        1024        1024        1024        128          128         32
peak -> min LR          6e-4->3e-4  6e-4->3e-4  3e-4->4e-5  1e-4->2e-5  6e-4->3e-4   6e-4->3e-4  1e-3->5e-4
warmup                  25          10          15          20          20           5           2
aux weight              0.1         0.1         0.03        0.01        0.1          0.1         0.1
EMA momentum            0.9         0.9         0.912       0.942       0.9          0.9         0.9
steps (cosine horizon)  300 (300)   500 (500)   600 (1200)  800 (1200)  300 (300)    80 (80)     24 (24)
MLP start / gap         20 / 2      20 / 2      30 / 4      50 / 4      20 / 10      5 / 3       2 / 1
q/k start / gap         44 / 2      68 / 2      174 / 4     242 / 4     70 / 10      18 / 3      6 / 1
v start / gap           68 / 3      116 / 3     318 / 6     434 / 6     120 / 15     31 / 4      10 / 1
final norm at           104         188         534         722         190          48          14
======================  ==========  ==========  ==========  ==========  ===========  ==========  ==========

"demo" fits the demo model (4 layers) on a CPU in minutes; "demo-quick" is its CI-sized version and "smoke" a
mechanics check for tiny models. Their numbers are not comparable with the paper's.

All paper presets use weight decay 0.01, gradient clipping at 1.0, bf16 autocast on GPUs and full fine-tuning of
every weight (norm weights and biases stay trainable). Gradient checkpointing was on for Small and Medium.
"""

from __future__ import annotations

import dataclasses
import math

from workbench.errors import InputError


@dataclasses.dataclass(frozen=True)
class RemovalSchedule:
    """When each norm site is frozen, in optimizer steps (0-based; a removal at step s happens before that
    step's update). Within a group, layer L goes at ``start + L * gap``; ``gap = 0`` removes the whole group
    at once."""

    mlp_start: int
    mlp_gap: int
    qk_start: int
    qk_gap: int
    v_start: int
    v_gap: int
    final_step: int

    def events(self, n_layers: int) -> list[tuple[int, str]]:
        """[(step, site)] sorted by step (ties keep the paper's order)."""
        out = []
        for kind, start, gap in (
            ("mlp", self.mlp_start, self.mlp_gap),
            ("qk", self.qk_start, self.qk_gap),
            ("v", self.v_start, self.v_gap),
        ):
            out += [(start + layer * gap, f"{kind}.{layer}") for layer in range(n_layers)]
        out.append((self.final_step, "final"))
        order = {site: i for i, (_, site) in enumerate(out)}
        return sorted(out, key=lambda e: (e[0], order[e[1]]))

    def last_step(self, n_layers: int) -> int:
        return max(step for step, _ in self.events(n_layers))

    def validate(self, n_layers: int, steps: int) -> None:
        """Raise `InputError` if a removal would happen after the run ends or at a negative step."""
        for name in ("mlp_start", "mlp_gap", "qk_start", "qk_gap", "v_start", "v_gap", "final_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise InputError(f"RemovalSchedule.{name}={value!r} must be a non-negative integer.")
        last = self.last_step(n_layers)
        if last >= steps:
            raise InputError(
                f"The schedule removes its last norm at step {last}, but the run has only {steps} steps "
                f"(0..{steps - 1}): raise steps or shorten the gaps."
            )


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters of a removal (or control) fine-tuning run. See the module docstring for presets."""

    steps: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    lr: float
    min_lr: float
    warmup: int
    schedule: RemovalSchedule
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    aux_weight: float = 0.1
    momentum: float = 0.9
    scheduler_steps: int | None = None  # cosine horizon; None = steps
    gradient_checkpointing: bool = False
    mask_eot_targets: bool = True  # the paper's collator never trains on predicting end-of-text
    precision: str = "auto"  # "auto" (bf16 autocast on GPUs, fp32 on CPU), "bf16" or "fp32"
    seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.seq_len

    @property
    def horizon(self) -> int:
        return self.scheduler_steps or self.steps

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warm-up from 0, then cosine to `min_lr`
        over the horizon (transformers' ``cosine_with_min_lr`` schedule, which the paper uses)."""
        if step < self.warmup:
            return self.lr * step / max(1, self.warmup)
        progress = (step - self.warmup) / max(1, self.horizon - self.warmup)
        factor = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return self.min_lr + (self.lr - self.min_lr) * factor

    def validate(self, n_layers: int, remove: bool = True) -> None:
        for name in ("steps", "micro_batch", "grad_accum", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"FinetuneConfig.{name}={value!r} must be a positive integer.")
        if not 0 < self.min_lr <= self.lr:
            raise InputError(f"Learning rates must satisfy 0 < min_lr <= lr (got {self.min_lr}, {self.lr}).")
        if not 0 <= self.momentum < 1:
            raise InputError(f"momentum={self.momentum} must lie in [0, 1).")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise InputError(f"precision={self.precision!r}: choose 'auto', 'bf16' or 'fp32'.")
        if self.aux_weight < 0:
            raise InputError(f"aux_weight={self.aux_weight} must be >= 0.")
        if remove:
            self.schedule.validate(n_layers, self.steps)

    def replace(self, **changes) -> FinetuneConfig:
        """A copy with some fields changed (``schedule`` may be given as a dict of its fields)."""
        if isinstance(changes.get("schedule"), dict):
            changes["schedule"] = dataclasses.replace(self.schedule, **changes["schedule"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FinetuneConfig:
        data = dict(data)
        data["schedule"] = RemovalSchedule(**data["schedule"])
        return cls(**data)


PRESETS: dict[str, FinetuneConfig] = {
    "gpt2": FinetuneConfig(
        steps=300, micro_batch=32, grad_accum=16, seq_len=1024, lr=6e-4, min_lr=3e-4, warmup=25,
        schedule=RemovalSchedule(20, 2, 44, 2, 68, 3, 104), aux_weight=0.1, gradient_checkpointing=True,
    ),
    "gpt2-medium": FinetuneConfig(
        steps=500, micro_batch=22, grad_accum=23, seq_len=1024, lr=6e-4, min_lr=3e-4, warmup=10,
        schedule=RemovalSchedule(20, 2, 68, 2, 116, 3, 188), aux_weight=0.1, gradient_checkpointing=True,
    ),
    "gpt2-large": FinetuneConfig(
        steps=600, micro_batch=28, grad_accum=18, seq_len=1024, lr=3e-4, min_lr=4e-5, warmup=15,
        schedule=RemovalSchedule(30, 4, 174, 4, 318, 6, 534), aux_weight=0.03, momentum=0.9 ** (28 / 32),
        scheduler_steps=1200,
    ),
    "gpt2-xl": FinetuneConfig(
        steps=800, micro_batch=18, grad_accum=28, seq_len=1024, lr=1e-4, min_lr=2e-5, warmup=20,
        schedule=RemovalSchedule(50, 4, 242, 4, 434, 6, 722), aux_weight=0.01, momentum=0.9 ** (18 / 32),
        scheduler_steps=1200,
    ),
    "demo": FinetuneConfig(
        steps=300, micro_batch=16, grad_accum=1, seq_len=128, lr=6e-4, min_lr=3e-4, warmup=20,
        schedule=RemovalSchedule(20, 10, 70, 10, 120, 15, 190), aux_weight=0.1,
    ),
    "demo-quick": FinetuneConfig(
        steps=80, micro_batch=8, grad_accum=1, seq_len=128, lr=6e-4, min_lr=3e-4, warmup=5,
        schedule=RemovalSchedule(5, 3, 18, 3, 31, 4, 48), aux_weight=0.1,
    ),
    "smoke": FinetuneConfig(
        steps=24, micro_batch=4, grad_accum=1, seq_len=32, lr=1e-3, min_lr=5e-4, warmup=2,
        schedule=RemovalSchedule(2, 1, 6, 1, 10, 1, 14), aux_weight=0.1,
    ),
}  # fmt: skip
"""Paper presets are named after the base model they fine-tune ("gpt2" is GPT-2 Small)."""


def preset(name: str, **changes) -> FinetuneConfig:
    """A preset by name, with optional field changes (e.g. ``preset("demo", steps=200)``)."""
    if name not in PRESETS:
        raise InputError(f"Unknown preset {name!r}; presets: {', '.join(PRESETS)}.")
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]


def removal_events(config: FinetuneConfig, n_layers: int) -> dict[int, list[str]]:
    """{step: [sites removed before that step's update]}."""
    out: dict[int, list[str]] = {}
    for step, site in config.schedule.events(n_layers):
        out.setdefault(step, []).append(site)
    return out
