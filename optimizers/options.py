"""What a model asks of the optimizer: the ``optimize`` block of its config, plus what the server knows
(target device, batch sizes). Static pydantic models, so a typo fails with the field's name."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from optimizers.errors import OptionsError
from optimizers.providers import Target

Precision = Literal["auto", "fp32", "fp16", "bf16", "int8", "none"]
Metric = Literal["rel_l2", "max_abs", "cosine", "top1"]
PrunePattern = Literal["unstructured", "2:4"]
Mode = Literal["background", "before_ready"]

#: Keys a model config's ``optimize`` block may set; the rest come from the server (or the CLI), never from
#: an uploaded config, so no API field carries a filesystem path.
CONFIG_KEYS = ("precision", "prune", "accuracy", "time_budget_s", "min_gain", "mode", "from_traffic")


class PruneOptions(BaseModel):
    """Magnitude pruning of MatMul/Gemm/Conv weights, asked for explicitly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sparsity: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Fraction of each weight tensor set to zero (2:4 is always 0.5)."""
    pattern: PrunePattern = "unstructured"
    """``unstructured`` (smallest magnitudes anywhere) or ``2:4`` (2 of every 4 along the input channels,
    the layout TensorRT's sparse tensor cores accelerate)."""

    @model_validator(mode="after")
    def _two_four_is_half(self) -> PruneOptions:
        if self.pattern == "2:4" and self.sparsity != 0.5:
            raise ValueError("pattern 2:4 zeroes exactly half the weights: sparsity must be 0.5 (or left out)")
        return self


class OptimizeOptions(BaseModel):
    """Everything one pipeline run depends on. ``precision`` picks the candidate family: ``auto`` lets
    every applicable pass compete, ``fp32|fp16|bf16|int8`` keep one family (``fp32``: nothing lossy at all;
    ``bf16``: OpenVINO's bf16 on CPUs with avx512_bf16 or AMX), ``none`` turns the pipeline off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    precision: Precision = "auto"
    """Which family of candidates may be served; the original always stays the fallback."""
    accuracy: dict[Metric, float] = Field(default_factory=dict)
    """Budgets that override the per-precision defaults (``rel_l2``/``max_abs``: at most; ``cosine``/``top1``:
    at least)."""
    prune: PruneOptions | None = None
    """Pruning, only when asked."""
    target: Target = "cpu"
    """Where the model will run: decides the candidates (FP16 only on GPUs) and the providers timed."""
    max_batch_size: int = Field(default=32, ge=0)
    """The config's max_batch_size (0: no batch dimension)."""
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    """The config's preferred batch sizes; the largest one is where throughput is compared."""
    input_shapes: dict[str, list[int]] = Field(default_factory=dict)
    """The config's ``dims`` per input (as Triton writes them: no batch dim when max_batch_size > 0, -1 for a
    dynamic dim), or a ``model_warmup`` entry's: the first shapes generated reference inputs are tried with."""
    samples_path: Path | None = None
    """A .npz of validation inputs (keys = input names); default: ``samples.npz`` next to the model."""
    time_budget_s: float = Field(default=1.5, gt=0.0, le=60.0)
    """Wall time allowed to time one candidate (all batch sizes together, session creation excluded)."""
    min_gain: float = Field(default=0.05, ge=0.0, le=1.0)
    """A candidate replaces the current choice only if its throughput is this fraction higher: timing noise
    must not swap a model for nothing."""
    reference_samples: int = Field(default=32, ge=1, le=4096)
    """How many random samples to generate when there is no samples file."""
    tune_instances: bool = False
    """The host leaves the instance count and the thread counts open (no explicit ``instance_group`` count nor
    thread parameters): on CPU the compile step also times N instances x T threads under concurrent load and
    may set :attr:`optimizers.runtime.SessionSpec.instances`. Set by the server (or the CLI), never by a config."""
    execution_providers: tuple[str, ...] = ()
    """The server's ``--execution-providers`` as the operator listed them (empty: the server's default order). An
    engine candidate whose provider is not listed is skipped, and a listed provider this machine cannot give is
    reported (the report's ``notes``) and logged, never dropped in silence. Set by the server, never by a config."""
    mode: Mode | None = None
    """When a server runs the pipeline: ``background`` (serve the original at once, swap the variant in when
    it is proven) or ``before_ready`` (the version is READY only once optimized). None: the server's default.
    Not part of the cache key: both modes select the same variant."""
    from_traffic: bool = True
    """Background mode: the server may calibrate and check on a sample of the version's real requests (false: it
    keeps none for this model). Part of the cache key only when false: the default's key may also hold the result
    of a run on traffic (see :meth:`optimizers.pipeline.Pipeline.share_result`), which an opt-out never gets."""

    @field_validator("accuracy")
    @classmethod
    def _budgets_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for metric, budget in value.items():
            if budget < 0 or (metric in ("cosine", "top1") and budget > 1):
                limits = "between 0 and 1" if metric in ("cosine", "top1") else "at least 0"
                raise ValueError(f"{metric}: budget {budget} must be {limits}")
        return value

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _positive_sizes(cls, value: list[int]) -> list[int]:
        if any(size < 1 for size in value):
            raise ValueError(f"batch sizes must be >= 1, got {value}")
        return value

    @property
    def preferred_batch_size(self) -> int:
        """The batch size whose throughput decides: the largest preferred size that fits, else
        min(max_batch_size, 8) (large batches would eat the timing budget in a few runs), 1 without batching."""
        if self.max_batch_size == 0:
            return 1
        fitting = [size for size in self.preferred_batch_sizes if size <= self.max_batch_size]
        return max(fitting) if fitting else min(self.max_batch_size, 8)

    @classmethod
    def from_config_dict(cls, block: dict[str, Any] | None, **server: Any) -> OptimizeOptions:
        """Options from a model config's ``optimize`` block; ``server`` adds what the server knows
        (``target``, ``max_batch_size``, ``preferred_batch_sizes``, ``samples_path``). Raises
        :class:`OptionsError` naming the field, e.g. ``optimize.prune.sparsity: ...``."""
        block = dict(block or {})
        unknown = sorted(set(block) - set(CONFIG_KEYS))
        if unknown:
            raise OptionsError(f"optimize.{unknown[0]}: unknown field; allowed: {', '.join(CONFIG_KEYS)}")
        return cls.validated({**block, **server}, prefix="optimize")

    @classmethod
    def validated(cls, data: dict[str, Any], prefix: str = "") -> OptimizeOptions:
        """Validate, turning pydantic's error into one :class:`OptionsError` line per problem."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise OptionsError(describe(exc, prefix)) from None

    def cache_dict(self) -> dict[str, Any]:
        """What the pipeline result depends on, for its cache key (the samples file is keyed by content)."""
        data = self.model_dump(mode="json", exclude={"samples_path", "mode"})
        for name in ("tune_instances", "execution_providers"):  # keys computed before these existed stay valid
            if not data[name]:
                del data[name]
        if data["from_traffic"]:  # the default's key may hold a result proven on traffic; an opt-out never gets it
            del data["from_traffic"]
        return data


def describe(exc: ValidationError, prefix: str = "") -> str:
    """``optimize.prune.sparsity: Input should be less than 1 (got 1.5)``, one line per error."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in (prefix, *error["loc"]) if part not in ("", "[key]"))
        message = str(error["msg"]).removeprefix("Value error, ")
        got = f" (got {error['input']!r})" if error["type"] != "missing" and error.get("input") is not None else ""
        lines.append(f"{where}: {message}{got}")
    return "; ".join(lines)
