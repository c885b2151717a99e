"""``FitConfig``: the settings of one fit, each defined once (docs/design.md, "Fitting EK-FAC").

Every field carries its help text and command-line option in its metadata (``hub_msif.options``):
``hub-msif fit`` generates its options from them, the plan takes the config (``plan_fit``), the
manifest records ``asdict(config)`` and the card's reproduce command is rendered from that record.
No torch here: the card renderer (``hub_msif.hub.cards``) imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hub_msif.artifacts.manifest import MODULE_CHOICES, STAGES
from hub_msif.errors import MsifValueError
from hub_msif.options import non_negative_int, positive_int, seed_int, setting

LABEL_MODES = ("sampled", "empirical")
STORAGE_DTYPE_NAMES = ("float32", "bfloat16", "float64")
ACCUMULATE_DTYPE_NAMES = ("float64", "float32")
MODEL_DTYPE_NAMES = ("bfloat16", "float16", "float32")


def _add_modules(parser, option) -> None:
    parser.add_argument("--modules", default="all", choices=list(MODULE_CHOICES), help=option.help)
    parser.add_argument("--module", action="append", default=[], metavar="NAME=ROLE",
                        help="explicit module and role (mlp, attn_qkv, attn_out), repeatable; for unmapped architectures")


def _parse_modules(args) -> str | dict[str, str]:
    if args.module:
        from hub_msif.factors.architectures import parse_module_specs

        return parse_module_specs(args.module)
    return args.modules


def _render_modules(value) -> list[str]:
    if isinstance(value, str):
        return ["--modules", value]
    return [item for name, role in value.items() for item in ("--module", f"{name}={role}")]


@dataclass
class FitConfig:
    """Settings of one fit; each field's metadata holds its option's help text and flag.

    Attributes:
        stage: ``pretrained`` or ``finetuned``: where the factors go in the folder.
        batch_size: sequences per forward/backward on each process.
        modules: ``all``, ``mlp`` or an explicit ``{module name: role}`` mapping.
        split_heads: one block per head and q/k/v for attention input projections.
        label_mode: ``sampled`` (true Fisher = GGN) or ``empirical`` (true labels).
        seed: seed of the label samples (per sequence, so independent of batching).
        storage_dtype: ``float32``, ``bfloat16`` or ``float64`` for the saved tensors.
        checkpoint_every: batches per process between checkpoints; 0 turns them off. The only
            setting that does not change the factors (left out of the card's reproduce command).
        module_partitions: K groups of modules fitted one after the other (2K passes over the
            data); only one group's accumulators live at a time (docs/design.md, "Module partitions and owners").
        accumulate_dtype: ``float64`` (default) or ``float32`` for the covariance and Lambda sums;
            eigendecompositions are float64 either way (docs/design.md, "Precision").
        model_dtype: ``bfloat16``, ``float16`` or ``float32`` to cast the model to for the forward
            and backward passes (meant for GPUs); None keeps the model's dtype.
        samples_per_sequence: label samples drawn per sequence in the Lambda pass and averaged
            (``sampled`` labels only).
    """

    stage: str = setting("pretrained", "which stage these factors are", choices=STAGES, required=True)
    batch_size: int = setting(8, "sequences per batch and process (default 8)", type=int)
    modules: str | Mapping[str, str] = setting(
        "all", "track all linear modules or MLP only (default all)", add=_add_modules, parse=_parse_modules,
        render=_render_modules)
    split_heads: bool = setting(True, "one block per q/k/v projection instead of per head",
                                flag="--no-split-heads")
    label_mode: str = setting("sampled", "sampled labels (true Fisher = GGN, default) or the data's labels "
                              "(empirical Fisher)", flag="--labels", choices=LABEL_MODES)
    seed: int = setting(0, "seed of the label samples, 0 to 2**63-1 (default 0)", type=seed_int)
    storage_dtype: str = setting("float32", "storage dtype of the factors (default float32)", flag="--dtype",
                                 choices=STORAGE_DTYPE_NAMES)
    checkpoint_every: int = setting(50, "batches between resumable checkpoints (0: none; default 50)",
                                    type=non_negative_int, reproduces=False)
    module_partitions: int = setting(
        1, "fit the modules in K groups (2K passes over the data, about K times less accumulator memory; "
        "default 1, or with --max-memory the fewest that fit)", type=positive_int, metavar="K", cli_default=None)
    accumulate_dtype: str = setting("float64", "dtype of the covariance and Lambda sums (default float64; "
                                    "eigendecompositions are float64)", choices=ACCUMULATE_DTYPE_NAMES)
    model_dtype: str | None = setting(None, "dtype of the model's forward and backward passes (default: as "
                                      "loaded; bfloat16 for GPUs)", choices=MODEL_DTYPE_NAMES)
    samples_per_sequence: int = setting(1, "label samples per sequence in the Lambda pass, averaged (default 1)",
                                        type=positive_int, metavar="S")

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise MsifValueError(f"stage must be one of {', '.join(STAGES)}, not {self.stage!r}")
        if self.batch_size < 1:
            raise MsifValueError(f"batch size must be positive, got {self.batch_size}")
        if self.label_mode not in LABEL_MODES:
            raise MsifValueError(f"label mode must be one of {', '.join(LABEL_MODES)}, not {self.label_mode!r}")
        if self.storage_dtype not in STORAGE_DTYPE_NAMES:
            raise MsifValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPE_NAMES)}, "
                                 f"not {self.storage_dtype!r}")
        if self.checkpoint_every < 0:
            raise MsifValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if not isinstance(self.module_partitions, int) or self.module_partitions < 1:
            raise MsifValueError(f"module partitions must be a positive integer, got {self.module_partitions!r}")
        if self.accumulate_dtype not in ACCUMULATE_DTYPE_NAMES:
            raise MsifValueError(f"accumulate dtype must be one of {', '.join(ACCUMULATE_DTYPE_NAMES)}, "
                                 f"not {self.accumulate_dtype!r}")
        if self.model_dtype is not None and self.model_dtype not in MODEL_DTYPE_NAMES:
            raise MsifValueError(f"model dtype must be one of {', '.join(MODEL_DTYPE_NAMES)}, not {self.model_dtype!r}")
        if not isinstance(self.samples_per_sequence, int) or self.samples_per_sequence < 1:
            raise MsifValueError(f"samples per sequence must be a positive integer, got {self.samples_per_sequence!r}")
        if self.samples_per_sequence > 1 and self.label_mode != "sampled":
            raise MsifValueError("several samples per sequence need sampled labels; empirical labels are all the same")
