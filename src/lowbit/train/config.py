"""Training configuration, learning-rate schedules and recipe files.

A recipe is a TOML file with up to six tables — ``[recipe]`` (name, description), ``[paper]``
(the number being reproduced and its source; free-form), ``[model]`` (``name`` + model options),
``[data]`` (``name``, ``split``, ``preprocess``, ``augment`` + dataset options), ``[method]``
(``name`` + ``lowbit.quantize`` options) and ``[train]`` (any :class:`TrainConfig` field). A recipe
NAME is looked up as ``lowbit/recipes/NAME.toml``; a path ending in ``.toml`` is read as is.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RECIPE_DIR", "TrainConfig", "find_recipe", "load_recipe", "lr_factor"]

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"

OPTIMIZERS = ("adam", "sgd", "adamax", "shift_adamax")
SCHEDULES = ("constant", "step", "exp", "cosine")
_SCHEDULE_ALIASES = {"none": "constant", "multistep": "step", "exponential": "exp"}
_LOSS_ALIASES = {"ce": "cross_entropy", "hinge": "squared_hinge", "l2svm": "squared_hinge"}


@dataclass
class TrainConfig:
    """Everything the :class:`~lowbit.train.Trainer` needs besides the model, data and method.

    Schedules (``lr`` is multiplied by :func:`lr_factor` at the start of every epoch, 0-based):
    ``constant``; ``step``: ``gamma`` per milestone passed (``milestones=[15, 25]`` = x0.1 after 15
    and after 25 finished epochs), or ``gammas[i]`` at milestone ``i`` when given (one factor per
    milestone: BinaryNet.pytorch's AlexNet 5e-3 -> 1e-3 -> 5e-4 -> 1e-4 -> 1e-5 is
    ``gammas=[0.2, 0.5, 0.2, 0.1]``), or, with ``step_size``, every ``step_size`` epochs; ``exp``:
    ``gamma`` per epoch after ``decay_start`` epochs, with ``gamma = (lr_final / lr) ** (1 / epochs)``
    when ``lr_final`` is given (BNN's 3e-3 -> 3e-7 over 1000 epochs gives 0.99083, §2.8);
    ``cosine``: ``(1 + cos(pi t / T)) / 2`` updated every step, ``t`` the epochs done so far
    (fractional) and ``T`` = ``epochs`` (not a paper schedule; the default of short runs).

    Weight decay: ``weight_decay_rules`` is a list of ``[regex, value]`` pairs matched (``re.search``)
    against parameter names, first match wins; parameters no rule matches get ``weight_decay`` if
    they have two or more dimensions (weights) and 0 otherwise (biases, BN). Decay is L2 added to
    the gradient (``wd * w``), i.e. ``wd / 2 * ||w||^2`` in the loss, TensorFlow's ``l2_loss``.

    ``init_from``: a run directory (its best checkpoint) or checkpoint file whose float weights
    are loaded into the model before it is quantized — the fine-tuning flows (TTQ CIFAR).

    ``fused``: Adam's single-pass kernel (``torch.optim.Adam(fused=True)``; the same update,
    rounded differently in the last bits) instead of PyTorch's per-tensor loop. ``None`` (the
    default) means on; it made a float 3x2048 MLP step 1.6x faster on the CPU. Runs resumed
    from a ``config.json`` written before this option existed keep the loop (``False``), so they
    continue exactly as they started. Other optimizers ignore it.
    Aliases accepted: schedule ``none`` = ``constant``; loss ``ce`` = ``cross_entropy``.
    """

    epochs: int = 10
    batch_size: int = 100
    eval_batch_size: int = 1000
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    weight_decay_rules: list[tuple[str, float]] = field(default_factory=list)
    schedule: str = "constant"
    milestones: list[int] = field(default_factory=list)
    step_size: int | None = None
    gamma: float = 0.1
    gammas: list[float] = field(default_factory=list)
    lr_final: float | None = None
    decay_start: int = 0
    loss: str = "cross_entropy"
    grad_clip_norm: float | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    eval_test: bool = True
    log_every: float = 30.0
    init_from: str | None = None
    fused: bool | None = None

    def __post_init__(self) -> None:
        self._check_types()
        self.optimizer = self.optimizer.lower()
        self.schedule = _SCHEDULE_ALIASES.get(self.schedule, self.schedule)
        self.loss = _LOSS_ALIASES.get(self.loss, self.loss)
        self.init_from = self.init_from or None
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size must be positive (got {self.epochs}, {self.batch_size})"
            )
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.milestones = [int(m) for m in self.milestones]
        self.gammas = [float(g) for g in self.gammas]
        if self.gammas and len(self.gammas) != len(self.milestones):
            raise ValueError(
                f"gammas has {len(self.gammas)} factors but milestones has {len(self.milestones)} "
                "epochs; give one factor per milestone (or leave gammas empty to use gamma)"
            )
        self.weight_decay_rules = [(str(r), float(v)) for r, v in self.weight_decay_rules]
        for rule, _ in self.weight_decay_rules:
            re.compile(rule)
        from lowbit.train.losses import get as _get_loss

        _get_loss(self.loss)

    def _check_types(self) -> None:
        """Scalar options of the wrong kind fail here, naming the option (``--set lr=abc`` or
        ``epochs = 1.5`` in a recipe), not deep inside training."""
        kinds = {
            "int": ("epochs", "batch_size", "eval_batch_size", "seed", "decay_start"),
            "int?": ("step_size", "threads"),
            "float": ("lr", "momentum", "eps", "weight_decay", "gamma", "log_every"),
            "float?": ("lr_final", "grad_clip_norm"),
            "bool": ("nesterov", "eval_test"),
            "bool?": ("fused",),
            "str": ("optimizer", "schedule", "loss", "device"),
        }
        for kind, names in kinds.items():
            base, optional = kind.rstrip("?"), kind.endswith("?")
            for name in names:
                v = getattr(self, name)
                if v is None and optional:
                    continue
                if base == "int":
                    ok = isinstance(v, int) and not isinstance(v, bool)
                    if isinstance(v, float) and v.is_integer():  # 10.0 from a hand-written file
                        setattr(self, name, int(v))
                        ok = True
                    what = "a whole number"
                elif base == "float":
                    ok = isinstance(v, int | float) and not isinstance(v, bool)
                    if ok:
                        setattr(self, name, float(v))
                    what = "a number"
                elif base == "bool":
                    ok, what = isinstance(v, bool), "true or false"
                else:
                    ok, what = isinstance(v, str), "a name"
                if not ok:
                    raise ValueError(f"training option {name} must be {what}, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict (a recipe's ``[train]`` table); unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown training option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists)."""
        return json_safe(dataclasses.asdict(self))


def json_safe(obj: Any) -> Any:
    """Tuples -> lists, recursively; for JSON config files."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def lr_factor(config: TrainConfig, epoch: float) -> float:
    """Multiplier of the base learning rate(s) during 0-based ``epoch``; ``cosine`` is evaluated
    at every step (``epoch`` + fraction of the epoch done), the others once per epoch."""
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch / config.epochs, 1.0)))
    epoch = int(epoch)
    if config.schedule == "step":
        if config.step_size:
            return config.gamma ** (epoch // config.step_size)
        if config.gammas:
            return math.prod(
                g for m, g in zip(config.milestones, config.gammas, strict=True) if epoch >= m
            )
        return config.gamma ** sum(epoch >= m for m in config.milestones)
    gamma = config.gamma
    if config.lr_final is not None:
        gamma = math.exp(math.log(config.lr_final / config.lr) / config.epochs)
    return gamma ** max(0, epoch - config.decay_start)


def find_recipe(name_or_path: str) -> Path:
    """Resolve a recipe name (``lowbit/recipes/NAME.toml``) or a ``.toml`` path."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"recipe file {p} does not exist")
        return p
    candidate = RECIPE_DIR / f"{name_or_path}.toml"
    if candidate.exists():
        return candidate
    known = sorted(q.stem for q in RECIPE_DIR.glob("*.toml")) if RECIPE_DIR.is_dir() else []
    raise ValueError(
        f"unknown recipe {name_or_path!r}; valid: {', '.join(known) or '(none installed)'} or a path to a .toml file"
    )


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """Read a recipe into ``{"recipe", "paper", "model", "data", "method", "train"}`` dicts.

    Also accepted: top-level ``name``/``description`` keys (go to ``recipe``), ``[data] dataset =``
    for ``name``, and ``batch_size`` under ``[data]`` (goes to ``train``).
    """
    path = find_recipe(name_or_path)
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"recipe {path} is not valid TOML: {exc}") from None
    tables = ("recipe", "paper", "model", "data", "method", "train")
    unknown = sorted(k for k, v in raw.items() if isinstance(v, dict) and k not in tables)
    if unknown:
        raise ValueError(
            f"{path}: unknown table(s) {', '.join(unknown)}; valid: {', '.join(tables)}"
        )
    out = {t: dict(raw.get(t, {})) for t in tables}
    # Top-level keys (name = ..., description = ...) belong to [recipe].
    out["recipe"].update({k: v for k, v in raw.items() if not isinstance(v, dict)})
    # Accepted spellings: [data] dataset = ... for name; batch sizes given under [data].
    if "dataset" in out["data"]:
        out["data"].setdefault("name", out["data"].pop("dataset"))
    for key in ("batch_size", "eval_batch_size"):
        if key in out["data"]:
            out["train"].setdefault(key, out["data"].pop(key))
    out["recipe"].setdefault("name", path.stem)
    out["recipe"]["path"] = str(path)
    return out
