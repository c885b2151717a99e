"""The memory plan of a fit, computed before any work from the model's config alone.

``plan_fit`` builds the model on the meta device (no weights read, nothing allocated), finds its
tracked modules with ``find_modules``, splits them into module partitions and owners exactly as the
fit does (``hub_msif.factors.partition``) and adds up, for every process, the bytes each phase of
the fit holds at its peak (docs/design.md, "Memory plan"). ``format_plan`` prints it as a table.

Bytes that are exact (from the shapes and the code): model weights and buffers; the covariance
accumulators ``A`` and ``S`` in the accumulation dtype; the eigenbases and eigenvalues (float64);
the eigenbasis copies the Lambda pass rotates with (compute dtype); the Lambda accumulator; the
factor artifact; one preconditioned query. Estimated (stated in ``ASSUMPTIONS``): activations
saved for backward, the logits and loss, the backward's working set and the temporaries of one
module's update and eigendecomposition. The language runtime (Python, torch, a CUDA context of
about 0.5-1 GB) and allocator fragmentation are not included.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hub_msif.errors import MsifValueError, UnsupportedArchitectureError
from hub_msif.factors.config import ACCUMULATE_DTYPE_NAMES, STORAGE_DTYPE_NAMES, FitConfig

GB = 10**9  # sizes print in GB (10**9 bytes) and say so; --max-memory also takes GiB
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
ACCUMULATE_DTYPES = ACCUMULATE_DTYPE_NAMES
MODEL_DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: a config may publish it
STORAGE_DTYPES = STORAGE_DTYPE_NAMES
# ekfac.py's _MAX_CHUNK_ELEMENTS: per-sequence rotated gradients formed at once in the Lambda pass.
LAMBDA_CHUNK_ELEMENTS = 64 * 1024 * 1024
# LAPACK's symmetric eigensolver (syevd, what torch.linalg.eigh runs) needs a workspace of about
# 2 n^2 doubles; with the symmetrised input and the eigenvectors that makes 4 n^2 doubles at once.
EIGH_MATRICES = 4
PHASES = ("covariance", "eigendecomposition", "lambda")

ASSUMPTIONS = (
    "Per process and phase, the largest over the module partitions. A process holds the sums, eigenbases and "
    "Lambda of the modules it owns only: each batch's inputs and gradients of a module are gathered to its owner "
    "(with several processes, one module at a time: every process's message of tokens x (d_in + d_out) values in "
    "the compute dtype, and on the owner all of them at once). Covariance pass: model weights, one batch's "
    "activations, the exchange buffers and the sums A [d_in, d_in] and S [blocks, bs, bs] (accumulation dtype) "
    "of the owned modules of the partition. Eigendecomposition: the owned A and S turning into float64 "
    "eigenbases one module at a time, plus 4 n^2 float64 (symmetrised input, eigenvectors, LAPACK workspace) of "
    "the matrix being decomposed. Lambda pass: model weights, activations, the exchange buffers, and of the "
    "owned modules the float64 eigenbases, their compute-dtype copies, the Lambda accumulators [d_out, d_in] "
    "(accumulation dtype) and the eigenvalues. Activations "
    "(estimate): saved for backward with frozen parameters, per token and layer in the model dtype, the "
    "residual stream, q/k/v (after the rotary embedding) and the attention output, with eager attention the "
    "softmax probabilities (heads x length), and the MLP activation's input (gated MLPs: gate, up and the "
    "activation's output); the hooks' copies of every tracked input of the partition (compute dtype); the "
    "logits with a float32 copy and its log-softmax; the float64 label-sampling distribution of one sequence; "
    "and the larger of one layer's forward temporaries and one module's update temporaries. Frozen "
    "parameters: no parameter gradients, no optimizer state. Not included: the Python/torch runtime, a CUDA "
    "context (about 0.5-1 GB), allocator caching and fragmentation."
)


@dataclass(frozen=True)
class ModulePlan:
    """One tracked module: shape, partition, owner and element counts."""

    name: str
    role: str
    d_in: int
    d_out: int
    num_blocks: int
    partition: int
    owner: int

    @property
    def block_size(self) -> int:
        return self.d_out // self.num_blocks

    @property
    def covariance_elements(self) -> int:
        """``A`` and ``S`` (per-head blocks only on the diagonal)."""
        return self.d_in * self.d_in + self.num_blocks * self.block_size * self.block_size

    @property
    def eigenvalue_elements(self) -> int:
        return self.d_in + self.d_out

    @property
    def lambda_elements(self) -> int:
        return self.d_out * self.d_in

    @property
    def stored_elements(self) -> int:
        """``q_a``, ``q_s``, ``lam``, ``eig_a``, ``eig_s`` as storage.py saves them."""
        return self.covariance_elements + self.lambda_elements + self.eigenvalue_elements

    def query_elements(self, rank: int | None) -> int:
        """One preconditioned query ``W_q`` of this module: full, or as ``U [d_out, r]``, ``V [r, d_in]``."""
        full = self.d_out * self.d_in
        return full if rank is None else min(full, rank * (self.d_in + self.d_out))


@dataclass(frozen=True)
class ProcessPlan:
    """What one process holds: bytes of every component at the peak of each phase."""

    rank: int
    owned_modules: int
    phases: dict[str, dict[str, int]]

    def phase_bytes(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.phase_bytes(self.peak_phase)


@dataclass(frozen=True)
class FitPlan:
    """The memory plan of one stage's fit (docs/design.md, "Memory plan")."""

    model: str
    model_type: str
    parameters: int
    stage: str
    num_processes: int
    module_partitions: int
    accumulate_dtype: str
    model_dtype: str
    compute_dtype: str
    storage_dtype: str
    batch_size: int
    max_length: int
    attention: str
    modules: str
    query_rank: int | None
    tracked_modules: list[ModulePlan]
    processes: list[ProcessPlan]
    passes: int
    artifact_bytes: int
    query_bytes: int
    full_rank_query_bytes: int
    model_bytes: int
    activation_bytes: int
    max_memory: int | None = None
    fits: bool | None = None
    note: str = ""
    assumptions: str = field(default=ASSUMPTIONS, repr=False)

    @property
    def per_process_peak_bytes(self) -> int:
        """The largest peak of any phase on any process."""
        return max(p.peak_bytes for p in self.processes)

    @property
    def peak_process(self) -> ProcessPlan:
        return max(self.processes, key=lambda p: (p.peak_bytes, -p.rank))

    @property
    def pair_artifact_bytes(self) -> int:
        return 2 * self.artifact_bytes

    def to_json(self) -> dict:
        """Everything as plain JSON values; ``per_process_peak_bytes`` at the top level."""
        data = asdict(self)
        data["tracked_modules"] = len(self.tracked_modules)
        data["modules_detail"] = [asdict(m) for m in self.tracked_modules]
        data["processes"] = [
            {"rank": p.rank, "owned_modules": p.owned_modules, "peak_bytes": p.peak_bytes, "peak_phase": p.peak_phase,
             "phase_bytes": {ph: p.phase_bytes(ph) for ph in PHASES}, "phases": p.phases}
            for p in self.processes
        ]
        peak = self.peak_process
        data.update({"per_process_peak_bytes": self.per_process_peak_bytes, "peak_phase": peak.peak_phase,
                     "peak_rank": peak.rank, "pair_artifact_bytes": self.pair_artifact_bytes})
        return data


# ----------------------------------------------------------------------------------------------
# Inputs


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str | int | float) -> int:
    """Bytes of ``70GB``, ``70 GB``, ``40GiB``, ``512MB`` or a plain number of bytes (1 GB = 1e9 B)."""
    if isinstance(text, bool):
        raise MsifValueError(f"bad memory size {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise MsifValueError(f"bad memory size {text!r}: use a number with a unit, e.g. 70GB, 40GiB or 512MB")
        value, unit = float(match.group(1)), (match.group(2) or "").lower().rstrip("b")
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise MsifValueError(f"bad memory size {text!r}: must be at least 1 byte")
    return int(size)


def format_bytes(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= 10**8 else f"{n / 10**6:.1f} MB"


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise MsifValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    return name if name in DTYPE_BYTES else None


def load_config(model_or_config, revision: str | None = None):
    """A transformers config from a Hub id, a folder with ``config.json``, a dict, a config or a model."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config
    if hasattr(model_or_config, "config") and isinstance(model_or_config.config, PretrainedConfig):
        return model_or_config.config
    if isinstance(model_or_config, Mapping):
        values = dict(model_or_config)
        check_shape_fields(values, "the config")
        model_type = values.pop("model_type", None)
        try:
            return AutoConfig.for_model(model_type, **values)
        except (ValueError, KeyError) as err:
            raise UnsupportedArchitectureError(
                f"config with model_type {model_type!r}: not an architecture transformers knows") from err
        except (TypeError, ZeroDivisionError) as err:
            raise _config_refused("config", err) from err
    source = str(model_or_config)
    folder = Path(source)
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"model folder {source} has no config.json")
        try:
            declared = json.loads(config_file.read_text())
        except (OSError, ValueError) as err:
            raise MsifValueError(f"{config_file} is not valid JSON: {err}") from err
        if not isinstance(declared, dict):
            raise MsifValueError(f"{config_file} does not hold a JSON object")
        check_shape_fields(declared, str(config_file))
        model_type = declared.get("model_type")
        try:
            return AutoConfig.from_pretrained(folder)
        except (ValueError, KeyError) as err:
            raise UnsupportedArchitectureError(
                f"model {source}: config.json has model_type {model_type!r}, an architecture transformers "
                f"does not know") from err
        except (TypeError, ZeroDivisionError) as err:
            raise _config_refused(source, err) from err
    from hub_msif.models import looks_like_repo_id

    if not looks_like_repo_id(source):
        raise FileNotFoundError(f"model folder {source} does not exist")
    try:
        return AutoConfig.from_pretrained(source, revision=revision)
    except (TypeError, ZeroDivisionError) as err:
        raise _config_refused(source, err) from err
    except (ValueError, KeyError) as err:
        raise UnsupportedArchitectureError(f"model {source}: its config is of an architecture transformers "
                                           f"does not know ({str(err).splitlines()[0] if str(err) else ''})") from err
    except OSError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FileNotFoundError(f"model {source!r}: its config.json could not be read: {first}") from err


# config.json fields that shape a model (GPT-2 style names too), and whether null is allowed
_SHAPE_FIELDS = {"vocab_size": False, "hidden_size": False, "n_embd": False, "d_model": False,
                 "num_hidden_layers": False, "n_layer": False, "num_layers": False, "num_attention_heads": False,
                 "n_head": False, "num_heads": False, "intermediate_size": True, "n_inner": True,
                 "num_key_value_heads": True, "head_dim": True}


def check_shape_fields(values: Mapping, where: str = "config.json") -> None:
    """Raises ``MsifValueError`` (one line naming the field) unless the fields of a config.json
    (``values``, as declared) that shape the model are positive integers and the attention heads
    divide the hidden size: transformers would otherwise fail with a traceback (a float vocabulary,
    a string layer count, zero heads) or build a model without layers."""
    if isinstance(values.get("text_config"), Mapping):
        check_shape_fields(values["text_config"], f"{where} text_config")
    for name, nullable in _SHAPE_FIELDS.items():
        if name not in values or (nullable and values[name] is None):
            continue
        value = values[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MsifValueError(f"{where} field {name} must be a positive integer, got {value!r}")
    hidden = next((values[n] for n in ("hidden_size", "n_embd", "d_model") if n in values), None)
    heads_name = next((n for n in ("num_attention_heads", "n_head", "num_heads") if n in values), None)
    if hidden is not None and heads_name is not None and values.get("head_dim") is None \
            and hidden % values[heads_name]:
        raise MsifValueError(f"{where} field {heads_name} ({values[heads_name]}) must divide the hidden size "
                             f"({hidden})")
    kv = values.get("num_key_value_heads")
    if kv is not None and heads_name is not None and values[heads_name] % kv:
        raise MsifValueError(f"{where} field num_key_value_heads ({kv}) must divide {heads_name} "
                             f"({values[heads_name]})")


def _config_refused(source: str, err: Exception) -> MsifValueError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return MsifValueError(f"model {source}: transformers refuses its config.json: {first}")


def meta_model(config):
    """The causal LM of ``config`` on the meta device: shapes only, no memory, no weights read.
    Its shape fields are checked first (``check_shape_fields``)."""
    import torch
    from transformers import AutoModelForCausalLM

    check_shape_fields(_text_config(config).to_dict() if hasattr(config, "to_dict") else {}, "the config")
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as err:
        raise UnsupportedArchitectureError(
            f"{type(config).__name__} (model_type={getattr(config, 'model_type', None)!r}) has no causal LM "
            "class in transformers") from err


# ----------------------------------------------------------------------------------------------
# The arithmetic


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def model_shape(config, tracked) -> dict:
    """Layers, hidden size, heads, q and kv widths, FFN width and vocabulary of ``config``."""
    c = _text_config(config)
    hidden = c.hidden_size
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    ffn = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden
    return {"layers": c.num_hidden_layers, "hidden": hidden, "heads": heads, "q_dim": heads * head_dim,
            "kv_dim": kv_heads * head_dim, "ffn": ffn, "vocab": c.vocab_size,
            "fused_qkv": not any(t.name.endswith("k_proj") for t in tracked),
            "gated": any(t.name.endswith("gate_proj") for t in tracked)}


def _activation_bytes(shape: dict, hooked_d_in: int, group: list[ModulePlan], phase: str, model_bytes_per: int,
                      compute_bytes: int, acc_bytes: int, batch_size: int, length: int, attention: str) -> int:
    """Estimated activation memory of one batch at its peak (see ``ASSUMPTIONS``).

    Saved for backward with frozen parameters (a linear layer then keeps no input), per token
    and layer: fused q|k|v (GPT-NeoX, BLOOM) keeps the residual, q|k|v, q and k after the
    rotary embedding and the attention output (``h + 6 q``) under sdpa, or q, k, v and the
    softmax probabilities under eager attention (``h + 3 q + heads x length``); separate
    projections (Llama and kin) keep two residuals, q and k after the rotary embedding, v and
    the attention output (``2 h + 2 q + 2 kv``, eager: ``2 h + 3 q + heads x length``, GQA's
    k/v repeated); the MLP keeps the activation's input (``ffn``; gated: gate, up and the
    activation's output, ``3 ffn``).
    """
    e, c, acc = model_bytes_per, compute_bytes, (acc_bytes if acc_bytes != compute_bytes else 0)
    tokens = batch_size * length
    h, q, kv, f = shape["hidden"], shape["q_dim"], shape["kv_dim"], shape["ffn"]
    eager = attention == "eager"
    residual = h if shape["fused_qkv"] else 2 * h
    if eager:
        attn = 3 * q
    else:
        attn = 6 * q if shape["fused_qkv"] else 2 * q + 2 * kv
    per_layer_bytes = tokens * (residual + attn + (3 * f if shape["gated"] else f)) * e
    if eager:
        per_layer_bytes += batch_size * shape["heads"] * length * length * e
    saved = shape["layers"] * per_layer_bytes + 2 * tokens * h * e  # + embedding output and final norm input
    hooks = tokens * hooked_d_in * c  # the captured inputs of every hooked module, held until its backward
    # Logits (model dtype), the float32 copy of the positions with a loss and its log-softmax;
    # the label draw's float64 softmax and running sum of one sequence.
    logits = tokens * shape["vocab"] * (e + 2 * 4) + 2 * 8 * length * shape["vocab"]
    # The largest of: one layer's forward temporaries, and one module's update temporaries:
    # covariance pass: its Gram matrix (added into the sum without a converted copy); Lambda pass:
    # the rotated inputs and gradients, the per-sequence chunk (squared in place) and its sum.
    if phase == "covariance":
        update = max(max(m.d_in ** 2, m.num_blocks * m.block_size ** 2) for m in group) * c
    else:
        update = max(_lambda_update(m, tokens, batch_size, c, acc) for m in group)
    return saved + hooks + logits + max(per_layer_bytes, update)


def _lambda_update(m: ModulePlan, tokens: int, batch_size: int, c: int, acc: int) -> int:
    per_sequence = m.d_out * m.d_in
    chunk = min(batch_size, max(1, LAMBDA_CHUNK_ELEMENTS // per_sequence))
    return tokens * (m.d_in + m.d_out) * c + chunk * per_sequence * c + per_sequence * c


def _eigh_matrices(acc_bytes: int) -> int:
    """float64 n x n matrices alive while one covariance is eigendecomposed: a float64 copy of a
    float32 sum, the symmetrised input, the eigenvectors and LAPACK's workspace (syevd, ~2 n^2)."""
    return EIGH_MATRICES + (1 if acc_bytes != 8 else 0)


def _process_phases(num_processes: int, groups: list[list[ModulePlan]], model_bytes: int, act, acc_bytes: int,
                    compute_bytes: int, tokens: int) -> list[ProcessPlan]:
    """The peak of each phase on every rank: the largest over the module partitions.

    Mirrors fit.py: a process holds the sums, float64 eigenbases, compute-dtype copies and Lambda of
    the modules it owns only; with several processes each batch's inputs and gradients of a module are
    gathered to its owner (one message per process, the owner receives all of them at once). At the
    phase boundary the owner turns its covariances into eigenbases one module at a time.
    """
    copies = 0 if compute_bytes == 8 else compute_bytes  # a float64 model rotates with the float64 basis itself
    per_rank: list[dict[str, dict[str, int]]] = [{phase: {} for phase in PHASES} for _ in range(num_processes)]
    for group in groups:
        hooked = sum(m.d_in for m in group)
        for rank in range(num_processes):
            mine = [m for m in group if m.owner == rank]
            basis = [8 * m.covariance_elements for m in mine]
            after = [b // 8 * copies + acc_bytes * m.lambda_elements for b, m in zip(basis, mine)]
            covs = [acc_bytes * m.covariance_elements for m in mine]
            # One module's exchange at a time: every process's message (1 + tokens (d_in + d_out) values),
            # the owner also holds what it receives from every process.
            exchange = 0 if num_processes == 1 else max(
                (num_processes + 1 if m.owner == rank else 1) * (1 + tokens * (m.d_in + m.d_out)) * compute_bytes
                for m in group)
            covariance = {"model_weights": model_bytes, "activations": act(hooked, group, "covariance"),
                          "exchange_buffers": exchange, "covariance_accumulators": sum(covs)}
            lam = {"model_weights": model_bytes, "activations": act(hooked, group, "lambda"),
                   "exchange_buffers": exchange, "eigenbases_float64": sum(basis),
                   "eigenbasis_copies": sum(b // 8 * copies for b in basis),
                   "lambda_accumulators": acc_bytes * sum(m.lambda_elements for m in mine),
                   "owned_eigenvalues_float64": 8 * sum(m.eigenvalue_elements for m in mine)}
            # Module i: the sums of owned modules i.. are still held, those before i are eigenbases already.
            best = {"model_weights": model_bytes, "covariance_accumulators_left": 0, "eigenbases_and_lambda_so_far": 0,
                    "eigh_workspace": 0}
            remaining, done = sum(covs), 0
            for i, m in enumerate(mine):
                temp = 8 * _eigh_matrices(acc_bytes) * max(m.d_in ** 2, m.num_blocks * m.block_size ** 2)
                parts = {"model_weights": model_bytes, "covariance_accumulators_left": remaining,
                         "eigenbases_and_lambda_so_far": done, "eigh_workspace": temp}
                if sum(parts.values()) > sum(best.values()):
                    best = parts
                remaining -= covs[i]
                done += basis[i] + after[i]
            worst = per_rank[rank]
            for phase, parts in (("covariance", covariance), ("eigendecomposition", best), ("lambda", lam)):
                if sum(parts.values()) > sum(worst[phase].values()):
                    worst[phase] = parts
    owned = [0] * num_processes
    for group in groups:
        for m in group:
            owned[m.owner] += 1
    return [ProcessPlan(rank, owned[rank], per_rank[rank]) for rank in range(num_processes)]


@functools.lru_cache(maxsize=1024)
def _groups(specs: tuple, k: int) -> list[list[str]]:
    from hub_msif.factors.partition import module_groups

    return module_groups(specs, k)


@functools.lru_cache(maxsize=64)
def _owners(specs: tuple, world: int) -> dict[str, int]:
    from hub_msif.factors.partition import module_owners

    return module_owners(specs, world)


def _plan_once(base: dict, k: int) -> FitPlan:
    tracked, n = base["tracked"], base["num_processes"]
    groups_names = _groups(tuple(tracked), k)
    owners = _owners(tuple(tracked), n)
    partition_of = {name: i for i, names in enumerate(groups_names) for name in names}
    modules = [ModulePlan(t.name, t.role, t.d_in, t.d_out, t.num_blocks, partition_of[t.name], owners[t.name])
               for t in tracked]
    groups = [[m for m in modules if m.partition == i] for i in range(k)]
    e, c = DTYPE_BYTES[base["model_dtype"]], DTYPE_BYTES[base["compute_dtype"]]
    acc = DTYPE_BYTES[base["accumulate_dtype"]]

    def act(hooked, group, phase):
        return _activation_bytes(base["shape"], hooked, group, phase, e, c, acc, base["batch_size"], base["max_length"],
                                 base["attention"])

    processes = _process_phases(n, groups, base["model_bytes"], act, acc, c, base["batch_size"] * base["max_length"])
    rank = base["query_rank"]
    return FitPlan(
        model=base["model"], model_type=base["model_type"], parameters=base["parameters"], stage=base["stage"],
        num_processes=n, module_partitions=k, accumulate_dtype=base["accumulate_dtype"],
        model_dtype=base["model_dtype"], compute_dtype=base["compute_dtype"], storage_dtype=base["storage_dtype"],
        batch_size=base["batch_size"], max_length=base["max_length"], attention=base["attention"],
        modules=base["modules"], query_rank=rank, tracked_modules=modules, processes=processes, passes=2 * k,
        artifact_bytes=DTYPE_BYTES[base["storage_dtype"]] * sum(m.stored_elements for m in modules),
        query_bytes=4 * sum(m.query_elements(rank) for m in modules),
        full_rank_query_bytes=4 * sum(m.query_elements(None) for m in modules),
        model_bytes=base["model_bytes"],
        activation_bytes=max(p.phases["lambda"]["activations"] for p in processes),
    )


def plan_fit(
    model_or_config,
    config: FitConfig | None = None,
    *,
    num_processes: int = 1,
    max_memory: int | str | None = None,
    choose_partitions: bool = True,
    max_length: int = 512,
    query_rank: int | None = None,
    attention: str | None = None,
    revision: str | None = None,
) -> FitPlan:
    """The memory plan of fitting one stage of ``model_or_config`` with ``config`` (a ``FitConfig``,
    default ``FitConfig()``; docs/design.md, "Memory plan").

    ``model_or_config`` is a Hub id or a folder (only ``config.json`` is read), a transformers
    config, a dict of config values with ``model_type``, or a model. The model dtype is
    ``config.model_dtype``, else the config's published dtype (what ``hub-msif fit`` loads), else
    float32; ``attention`` defaults to the config's attention implementation (``eager`` keeps the
    softmax probabilities, ``sdpa`` and flash kernels do not). ``max_length`` is the corpus's
    (``CorpusSpec.max_length``). ``query_rank`` ``None`` is a full-rank query.

    Without ``max_memory`` the plan has ``config.module_partitions`` partitions. With it (bytes or
    a string like ``70GB``): ``choose_partitions`` takes the smallest number of partitions whose
    per-process peak fits (the plan's ``note`` says which), otherwise ``config.module_partitions``
    is checked against it. When nothing fits, ``MsifValueError`` says what would.
    """
    config = FitConfig() if config is None else config
    stage, batch_size, modules = config.stage, config.batch_size, config.modules
    accumulate_dtype, model_dtype, storage_dtype = config.accumulate_dtype, config.model_dtype, config.storage_dtype
    split_heads = config.split_heads
    module_partitions = None if (max_memory is not None and choose_partitions) else config.module_partitions
    if not isinstance(module_partitions, (int, type(None))) or isinstance(module_partitions, bool) or \
            (module_partitions is not None and module_partitions < 1):
        raise MsifValueError(f"module partitions must be a positive integer, got {module_partitions!r}")
    from hub_msif.artifacts.manifest import STAGES
    from hub_msif.factors.architectures import find_modules

    if stage not in STAGES:
        raise MsifValueError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
    for name, value in (("num_processes", num_processes), ("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MsifValueError(f"{name} must be a positive integer, got {value!r}")
    if query_rank is not None and (isinstance(query_rank, bool) or not isinstance(query_rank, int) or query_rank < 1):
        raise MsifValueError(f"query rank must be a positive integer, got {query_rank!r}")
    _check_choice("accumulate dtype", accumulate_dtype, ACCUMULATE_DTYPES)
    _check_choice("storage dtype", storage_dtype, STORAGE_DTYPES)
    budget = None if max_memory is None else parse_size(max_memory)

    hf_config = load_config(model_or_config, revision)
    model = meta_model(hf_config) if not hasattr(model_or_config, "named_modules") else model_or_config
    tracked = find_modules(model, modules, split_heads)
    published = dtype_name(getattr(hf_config, "dtype", None)) or dtype_name(hf_config.to_dict().get("torch_dtype"))
    model_dtype = model_dtype or published or "float32"
    _check_choice("model dtype", model_dtype, MODEL_DTYPES)
    attention = attention or getattr(hf_config, "_attn_implementation", None) or "sdpa"
    seen, parameters, model_bytes = set(), 0, 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if tensor.is_floating_point():
            model_bytes += tensor.numel() * DTYPE_BYTES[model_dtype]
        else:
            model_bytes += tensor.numel() * tensor.element_size()
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    base = {
        "model": str(getattr(hf_config, "_name_or_path", "") or model_or_config) if isinstance(model_or_config, (str, Path))
        else str(getattr(hf_config, "_name_or_path", "") or type(model).__name__),
        "model_type": getattr(hf_config, "model_type", ""), "parameters": parameters, "stage": stage,
        "num_processes": num_processes, "accumulate_dtype": accumulate_dtype, "model_dtype": model_dtype,
        "compute_dtype": "float64" if model_dtype == "float64" else "float32", "storage_dtype": storage_dtype,
        "batch_size": batch_size, "max_length": max_length, "attention": attention,
        "modules": modules if isinstance(modules, str) else "explicit", "query_rank": query_rank,
        "tracked": tracked, "shape": model_shape(hf_config, tracked), "model_bytes": model_bytes,
    }
    if isinstance(model_or_config, (str, Path)):
        base["model"] = str(model_or_config)

    if budget is None:
        plan = _plan_once(base, module_partitions or 1)
        return plan
    if module_partitions is not None:
        plan = _plan_once(base, module_partitions)
        if plan.per_process_peak_bytes <= budget:
            return _with(plan, budget, True, f"fits {format_bytes(budget)} per process with {module_partitions} "
                                             f"module partition(s)")
        smallest = _smallest_fitting(base, budget)
        hint = (f"; {smallest.module_partitions} partitions would fit" if smallest is not None
                else "; " + _what_would_fit(base, budget))
        raise MsifValueError(
            f"{module_partitions} module partition(s) need {format_bytes(plan.per_process_peak_bytes)} per process, "
            f"more than the {format_bytes(budget)} allowed{hint}")
    fitting = _smallest_fitting(base, budget)
    if fitting is None:
        raise MsifValueError(f"nothing fits {format_bytes(budget)} per process: {_what_would_fit(base, budget)}")
    return _with(fitting, budget, True, f"{fitting.module_partitions} is the smallest number of module partitions that "
                                        f"fits {format_bytes(budget)} per process ({fitting.passes} passes over the data)")


def plan_of_fit(model, config: FitConfig, num_processes: int, max_length: int) -> FitPlan:
    """The plan of the fit ``fit_factors`` is about to run: ``model`` loaded, ``config`` its ``FitConfig``.

    The model dtype is ``config.model_dtype`` or else the loaded weights' dtype. Print it with ``format_plan``.
    """
    from dataclasses import replace

    dtype = config.model_dtype or dtype_name(next(model.parameters()).dtype) or "float32"
    return plan_fit(model, replace(config, model_dtype=dtype), num_processes=num_processes, max_length=max_length)


def _with(plan: FitPlan, budget: int, fits: bool, note: str) -> FitPlan:
    from dataclasses import replace

    return replace(plan, max_memory=budget, fits=fits, note=note)


def _peak(base: dict, k: int) -> int:
    return _plan_once(base, k).per_process_peak_bytes


def _smallest_fitting(base: dict, budget: int) -> FitPlan | None:
    """The plan with the fewest partitions that fits ``budget``, or None.

    Every partition of K groups holds at least what the group of its largest member alone would,
    so the plan with one module per partition is the least any K needs: when it does not fit,
    nothing does. Otherwise the partitions are tried in order (the peak does not fall with every
    extra partition, balancing being greedy); each try is arithmetic only.
    """
    if _plan_once(base, len(base["tracked"])).per_process_peak_bytes > budget:
        return None
    for k in range(1, len(base["tracked"]) + 1):
        plan = _plan_once(base, k)
        if plan.per_process_peak_bytes <= budget:
            return plan
    return None


def _what_would_fit(base: dict, budget: int) -> str:
    """One sentence: the smallest peak reachable, and which changes would fit ``budget``."""
    most = len(base["tracked"])
    floor = _plan_once(base, most)
    options = []
    if base["accumulate_dtype"] == "float64":
        alt = _smallest_fitting(base | {"accumulate_dtype": "float32"}, budget)
        if alt is not None:
            options.append(f"--accumulate-dtype float32 with {alt.module_partitions} partition(s)")
    if base["modules"] != "mlp":
        mlp = [t for t in base["tracked"] if t.role == "mlp"]
        if mlp:
            alt = _smallest_fitting(base | {"tracked": mlp, "modules": "mlp"}, budget)
            if alt is not None:
                options.append(f"--modules mlp with {alt.module_partitions} partition(s)")
    for batch in (4, 2, 1):
        if batch < base["batch_size"]:
            alt = _smallest_fitting(base | {"batch_size": batch}, budget)
            if alt is not None:
                options.append(f"--batch-size {batch} with {alt.module_partitions} partition(s)")
                break
    reach = (f"even {most} partitions need {format_bytes(floor.per_process_peak_bytes)} per process "
             f"(model weights {format_bytes(base['model_bytes'])}, activations {format_bytes(floor.activation_bytes)})")
    if options:
        return reach + "; would fit: " + ", or ".join(options)
    return reach + "; no change tried fits (float32 accumulation, MLP modules only, a smaller " \
                   "batch): use a larger memory budget or shorter sequences"


# ----------------------------------------------------------------------------------------------
# Printing


def _count_text(n: int) -> str:
    """``2.78 B``, ``405 M``, ``83.2 k``: a parameter count at a readable scale."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def format_plan(plan: FitPlan) -> str:
    """The plan as a human-readable table (printed by ``hub-msif fit --plan`` and at the start of a fit)."""
    rank_text = "full rank" if plan.query_rank is None else f"rank {plan.query_rank}"
    lines = [
        f"memory plan: {plan.model} ({plan.model_type}, {_count_text(plan.parameters)} parameters), {plan.stage} stage "
        "(sizes in GB = 10^9 bytes)",
        f"  {len(plan.tracked_modules)} tracked modules ({plan.modules}), {plan.num_processes} process(es), "
        f"{plan.module_partitions} module partition(s), {plan.accumulate_dtype} accumulation, model "
        f"{plan.model_dtype} (compute {plan.compute_dtype}), batch {plan.batch_size} x {plan.max_length} tokens, "
        f"{plan.attention} attention",
        f"  passes over the data: {plan.passes} (a covariance and a Lambda pass per partition)",
        f"  artifact: {format_bytes(plan.artifact_bytes)} for this stage in {plan.storage_dtype} "
        f"({format_bytes(plan.pair_artifact_bytes)} for a pair)",
        f"  one preconditioned query: {format_bytes(plan.query_bytes)} ({rank_text}"
        + (f"; full rank {format_bytes(plan.full_rank_query_bytes)})" if plan.query_rank else ")"),
        f"  model weights {format_bytes(plan.model_bytes)}, parameter gradients 0 (input gradients only), "
        f"activations up to {format_bytes(plan.activation_bytes)}",
        "",
        f"  {'rank':>4} {'modules':>7} {'covariance pass':>16} {'eigendecomp.':>13} {'Lambda pass':>12} {'peak':>10}",
    ]
    for p in plan.processes:
        lines.append(f"  {p.rank:>4} {p.owned_modules:>7} {format_bytes(p.phase_bytes('covariance')):>16} "
                     f"{format_bytes(p.phase_bytes('eigendecomposition')):>13} "
                     f"{format_bytes(p.phase_bytes('lambda')):>12} {format_bytes(p.peak_bytes):>10}")
    peak = plan.peak_process
    lines.append("")
    lines.append(f"  per-process peak: {format_bytes(plan.per_process_peak_bytes)} (rank {peak.rank}, "
                 f"{peak.peak_phase} phase):")
    for name, value in peak.phases[peak.peak_phase].items():
        lines.append(f"    {name.replace('_', ' '):<34} {format_bytes(value):>10}")
    if plan.note:
        lines.append(f"  {plan.note}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Measured time (fit --plan --measure)


@dataclass(frozen=True)
class FitTiming:
    """Measured throughput of one planned fit on this machine, and the fit time it implies.

    ``forward_seconds`` and ``backward_seconds``: one forward and one backward of the planned batch
    (``batch_size x max_length`` random tokens, sampled labels) with the fit's capture hooks on every
    tracked module. ``covariance_update_seconds`` and ``lambda_update_seconds``: the accumulator
    updates of every tracked module for that batch (timed once per distinct module shape, on the
    captured activations and gradients, and counted for every module of that shape). Per batch the
    fit takes ``K (2 forward + (1 + S) backward) + covariance updates + S Lambda updates`` seconds
    (K module partitions, S label samples per sequence); the eigendecompositions (a fixed cost,
    independent of the tokens) are not included.
    """

    device: str
    threads: int
    batch_size: int
    max_length: int
    model_dtype: str
    forward_seconds: float
    backward_seconds: float
    covariance_update_seconds: float
    lambda_update_seconds: float
    module_partitions: int
    samples_per_sequence: int
    tokens: int | None

    @property
    def seconds_per_batch(self) -> float:
        k, s = self.module_partitions, self.samples_per_sequence
        return (k * (2 * self.forward_seconds + (1 + s) * self.backward_seconds)
                + self.covariance_update_seconds + s * self.lambda_update_seconds)

    @property
    def seconds_per_token(self) -> float:
        return self.seconds_per_batch / (self.batch_size * self.max_length)

    @property
    def estimated_seconds(self) -> float | None:
        """Seconds to fit ``tokens`` (full-length sequences), or None when the token count is not known."""
        return None if self.tokens is None else self.seconds_per_token * self.tokens

    def to_json(self) -> dict:
        return asdict(self) | {"seconds_per_batch": self.seconds_per_batch, "seconds_per_token": self.seconds_per_token,
                               "seconds_per_million_tokens": self.seconds_per_token * 1e6,
                               "estimated_seconds": self.estimated_seconds}


def _duration_text(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_timing(timing: FitTiming) -> str:
    """The measured throughput and the time estimate, under the plan (``hub-msif fit --plan --measure``)."""
    lines = [
        f"measured on {timing.device} ({timing.threads} thread(s)), random weights in {timing.model_dtype}, "
        f"batch {timing.batch_size} x {timing.max_length} tokens:",
        f"  forward {timing.forward_seconds:.3f} s, backward {timing.backward_seconds:.3f} s (capture hooks on), "
        f"accumulator updates {timing.covariance_update_seconds:.3f} s (covariance) + "
        f"{timing.lambda_update_seconds:.3f} s (Lambda)",
        f"  {timing.seconds_per_batch:.3f} s per batch over both passes and {timing.module_partitions} partition(s): "
        f"{timing.seconds_per_token * 1e6:.1f} s per million tokens",
    ]
    if timing.estimated_seconds is None:
        lines.append("  estimated fit time: give --max-tokens, or --max-sequences (x --max-length), for a total; "
                     f"{_duration_text(timing.seconds_per_token * 1e6)} per million tokens")
    else:
        lines.append(f"  estimated fit time for {timing.tokens:,} tokens: {_duration_text(timing.estimated_seconds)} "
                     "(one process; eigendecompositions not included)")
    return "\n".join(lines)


def measure_fit(model_or_config, config: FitConfig, plan: FitPlan, *, tokens: int | None = None,
                revision: str | None = None, device: str | None = None) -> FitTiming:
    """Times one forward and backward of ``plan``'s batch on this machine (docs/design.md, "Memory plan").

    The model is built from its config (only ``config.json`` is read) with random weights, in the
    plan's model dtype, on ``device`` (default: CUDA when available, else the CPU); the batch is
    ``plan.batch_size x plan.max_length`` random tokens, the loss the fit's (``config.label_mode``),
    with the fit's capture hooks (``GradientCapture``) on the tracked modules, after an untimed
    warm-up on a short batch. ``tokens`` (to fit) gives ``estimated_seconds``.
    """
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from hub_msif.factors.architectures import find_modules
    from hub_msif.factors.capture import GradientCapture, input_gradients_only
    from hub_msif.factors.ekfac import CovarianceAccumulator, LambdaAccumulator
    from hub_msif.factors.objectives import lm_loss

    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise MsifValueError(f"tokens to fit must be a positive integer, got {tokens!r}")
    hf_config = load_config(model_or_config, revision)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, plan.model_dtype)
    try:
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except (ValueError, KeyError) as err:
        raise UnsupportedArchitectureError(f"{type(hf_config).__name__} has no causal LM class in transformers") from err
    model.to(torch_device).eval()
    tracked = find_modules(model, config.modules, config.split_heads)
    # One accumulator update is timed per distinct module shape, on the first such module's batch.
    shapes: dict[tuple, dict] = {}
    for t in tracked:
        shapes.setdefault((t.d_in, t.d_out, t.num_blocks), {"count": 0, "spec": t, "captured": None})["count"] += 1

    def keep(spec, a, g):
        entry = shapes[(spec.d_in, spec.d_out, spec.num_blocks)]
        if entry["spec"] is spec:
            entry["captured"] = (a.detach().clone(), g.detach().clone())

    b, n = plan.batch_size, plan.max_length
    vocab = _text_config(hf_config).vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, n), generator=generator).to(torch_device)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
             "sequence_index": torch.arange(b, device=torch_device)}

    def sync():
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)

    capture = GradientCapture(model, tracked, keep)
    with input_gradients_only(model), capture:
        # A short warm-up first (lazy initialisation, first allocations), not timed.
        short = {k: v[:1, : min(n, 16)] if v.dim() == 2 else v[:1] for k, v in batch.items()}
        capture.mask = short["attention_mask"]
        lm_loss(model(input_ids=short["input_ids"], attention_mask=short["attention_mask"], use_cache=False).logits,
                short, config.label_mode, config.seed).backward()
        for entry in shapes.values():
            entry["captured"] = None
        capture.mask = batch["attention_mask"]
        sync()
        started = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits
        loss = lm_loss(logits, batch, config.label_mode, config.seed)
        sync()
        forward = time.perf_counter() - started
        loss.backward()
        sync()
        backward = time.perf_counter() - started - forward
    del logits, loss
    accumulate = getattr(torch, config.accumulate_dtype)
    covariance = lam = 0.0
    for entry in shapes.values():
        if entry["captured"] is None:
            continue
        count, spec, (a, g) = entry["count"], entry["spec"], entry["captured"]
        covariance_acc = CovarianceAccumulator(spec, torch_device, accumulate)
        sync()
        started = time.perf_counter()
        covariance_acc.update(a, g)
        sync()
        covariance += count * (time.perf_counter() - started)
        del covariance_acc
        q_a = torch.eye(spec.d_in, dtype=torch.float64, device=torch_device)
        q_s = torch.eye(spec.block_size, dtype=torch.float64, device=torch_device).expand(spec.num_blocks, -1, -1)
        lambda_acc = LambdaAccumulator(spec, q_a, q_s.contiguous(), a.dtype, accumulate)
        sync()
        started = time.perf_counter()
        lambda_acc.update(a, g)
        sync()
        lam += count * (time.perf_counter() - started)
        del lambda_acc, q_a, q_s
    name = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu"
    return FitTiming(device=name, threads=torch.get_num_threads(), batch_size=b, max_length=n,
                     model_dtype=plan.model_dtype, forward_seconds=forward, backward_seconds=backward,
                     covariance_update_seconds=covariance, lambda_update_seconds=lam,
                     module_partitions=plan.module_partitions, samples_per_sequence=config.samples_per_sequence,
                     tokens=tokens)
