"""The one typed configuration: dataclasses, loaded from YAML, with `--set key=value` overrides.

The sections are the settings of the parts themselves: `data` is the loader's LoaderConfig
(plus the dataset and its splits), `model` is what mlc.models.build_model takes. Files,
`--set` overrides and the config stored in a checkpoint all go through the same validation;
a config carries its version, and older versions are migrated (``migrate``).

Durations, schedules and intervals are in samples (not epochs, whose length changes with the
dataset and the number of ranks). Unknown keys and values of the wrong type are errors that list
what is valid; config files are input from elsewhere, so nothing in them is executed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.resources
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_VERSION = 2  # 2: batch_size and the loader seed moved from `train` to `data`

# Keys of older versions, and where they are now.
MOVED = {"train.batch_size": "data.batch_size"}


# train.precision and train.device (and --precision, --device): mlc.accel resolves them.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_problem(spec) -> str | None:
    """What is wrong with a device name, or None (auto, cpu, cuda, cuda:N)."""
    if not isinstance(spec, str) or not DEVICE_PATTERN.fullmatch(spec):
        return f"must be auto, cpu, cuda or cuda:N, got {spec!r}"
    return None


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


@dataclass
class LoaderConfig:
    """How a split is read (mlc.data's loaders take this class, or the `data` section)."""

    batch_size: int = 32  # per process
    image_size: int = 64
    # "train": shuffled, augmented, endless; "eval": one ordered pass. Chosen per split.
    mode: str = field(default="train", metadata={"per_split": True})
    channels: int = 3
    shuffle_buffer: int = 2000  # raw samples held for shuffling (train only)
    crop_fraction: float = 0.875  # eval: central crop of the shorter side
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # train: crop area
    seed: int = 0  # shard order, shuffling and augmentation
    num_workers: int = 2
    retries: int = 2  # extra attempts to open a shard before reporting it
    allow_pipe: bool = False  # pipe: URLs run commands; only for shard lists you trust

    def __post_init__(self):
        problem = loader_problem(self)
        if problem:
            raise ValueError(problem)


@dataclass
class DataConfig(LoaderConfig):
    """The `data` section: which dataset and splits, and the loader settings for them. ``mode``
    is not a key: the job reads the training split in train mode and validates in eval mode."""

    dataset: str = "runs/demo/data"  # an `mlc shard` folder
    train_split: str = "train"
    val_split: str | None = "test"
    # Samples of a split that may be lost (missing or damaged shards, corrupt samples) before
    # the job stops: of the training passes so far, and of each validation pass.
    max_lost_fraction: float = 0.01


@dataclass
class ModelConfig:
    """The `model` section: mlc.models.build_model takes this class."""

    name: str = "xception-tiny"  # a preset of mlc.models
    width: float | None = None  # preset overrides, None = the preset's
    middle_blocks: int | None = None
    fc_layers: list[int] = field(default_factory=list)
    dropout: float = 0.0
    head_prior: float | None = 0.01
    channels_last: bool = True
    init: str | None = None  # "keras:PATH.h5" or "timm:PATH.pth": ImageNet weights
    init_drop_head: bool = True


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | rmsprop | adamw
    lr: float = 0.045  # at the reference batch size below
    lr_batch_size: int = 0  # lr scales linearly with global batch / this (0: no scaling)
    momentum: float = 0.9
    weight_decay: float = 1e-5
    rmsprop_alpha: float = 0.9
    rmsprop_eps: float = 1.0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    decay_rate: float = 0.94  # lr *= decay_rate every decay_every samples (staircase)
    decay_every: int = 2_562_334  # 2 ImageNet epochs
    warmup: int = 0  # samples of linear warm-up


@dataclass
class TrainConfig:
    samples: int = 1_000_000  # total training samples (all processes)
    seed: int = 0  # model initialisation and dropout (the data's seed is data.seed)
    deterministic: bool = False  # bitwise-reproducible (single process; slower)
    # Where and how the network runs (mlc.accel; docs/training.md). device: auto (cuda:LOCAL_RANK
    # when torch sees a GPU, else cpu) | cpu | cuda | cuda:N. precision: auto (CUDA: bf16
    # autocast, or fp16 with a gradient scaler on GPUs without bf16; CPU: fp32, or bf16 where
    # it was measured to train as well and faster) | fp32 | bf16 | fp16 (CUDA only).
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False  # torch.compile the network's forward (off: no gain measured yet)
    ema_decay: float = 0.0  # 0 = no EMA of weights
    out: str = "runs/train"
    log_every: int = 5_000  # samples
    eval_every: int = 50_000
    checkpoint_every: int = 50_000
    keep_last: int = 3
    eval_k: int = 100
    eval_max_samples: int = 0  # 0 = the whole validation split
    mode: str = "sync"  # sync (one process or DDP) | async (parameter servers, section ps)
    # TensorBoard scalars in <out>/tensorboard: auto (when the tensorboard package is installed;
    # otherwise a note says it is off) | true (needed: stop without it) | false
    tensorboard: bool | str = "auto"


@dataclass
class PsConfig:
    """The asynchronous mode (train.mode=async, docs/async.md): S servers, W workers."""

    servers: int = 1
    workers: int = 2
    push_in_flight: int = 1  # unanswered pushes a worker may have (0 = wait for each)
    pull_every: int = 1  # worker steps between parameter pulls
    max_staleness: int | None = None  # drop (and count) updates staler than this; None = keep
    addr: str = "127.0.0.1"  # rendezvous: the machine that runs server 0 (node 0)
    port: int = 0  # rendezvous port; 0 = a free one (one machine only)
    nodes: int = 1  # machines; server i and worker j run on node i % nodes and j % nodes
    node_rank: int = 0  # this machine's number
    threads: int = 1  # torch threads per process
    rpc_timeout: float = 60.0  # seconds for any one call between processes
    start_timeout: float = 120.0  # seconds for all processes to start and meet
    stop_timeout: float = 30.0  # seconds a process gets to exit before it is killed
    restart_workers: int = 0  # restarts per worker slot (replacements rejoin); 0 = none


@dataclass
class Config:
    version: int = CONFIG_VERSION
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ps: PsConfig = field(default_factory=PsConfig)


def _check_type(value, hint, where: str):
    """value coerced to the dataclass field's type, or ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 2e6 (no dot) as a string
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}") from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _apply(obj, values: dict, where: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'the config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields or fields[key].metadata.get("per_split"):
            raise ConfigError(_unknown(name, key, fields, where))
        if dataclasses.is_dataclass(getattr(obj, key)):
            _apply(getattr(obj, key), value, name)
        else:
            setattr(obj, key, _check_type(value, hints[key], name))


def _unknown(name: str, key, fields: dict, where: str) -> str:
    if name in MOVED:
        return f"{name} is {MOVED[name]} since config version 2"
    if key in fields:  # a per-split setting such as data.mode
        return f"{name} is not a setting: the job reads each split in its own mode"
    valid = ", ".join(k for k, f in fields.items() if not f.metadata.get("per_split"))
    what = f"{where}: unknown key {key!r}" if where else f"unknown section {key!r}"
    return f"{what}; valid keys: {valid}"


def parse_override(text: str) -> dict:
    """ "train.samples=2e6" -> {"train": {"samples": 2e6}}; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = str(e).splitlines()[0]
        raise ConfigError(f"--set {text}: the value is not valid YAML ({problem})") from None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def migrate(data: dict, source: str, default_version: int = CONFIG_VERSION) -> dict:
    """A config dict of an older version in the current version's keys. A file without
    ``version`` is taken as current; a checkpoint without one is of version 1."""
    version = data.get("version", default_version)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ConfigError(f"{source}: version must be a whole number, got {version!r}")
    if version > CONFIG_VERSION:
        raise ConfigError(
            f"{source}: config version {version} is newer than this mlc's ({CONFIG_VERSION}); "
            "upgrade mlc"
        )
    data = copy.deepcopy(data)
    if version < 2:  # batch size and the data seed moved to the data section
        train, section = data.get("train") or {}, data.setdefault("data", {})
        if isinstance(train, dict) and isinstance(section, dict):
            if "batch_size" in train:
                section["batch_size"] = train.pop("batch_size")
            if "seed" in train:
                section.setdefault("seed", train["seed"])
    data["version"] = CONFIG_VERSION
    return data


def config_from_dict(
    data: dict, source: str = "the config", default_version: int = CONFIG_VERSION
) -> Config:
    """A validated Config from a dict (a checkpoint's, a config.json); errors name ``source``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
    config = Config()
    try:
        _apply(config, migrate(data, source, default_version), "")
        check(config)
    except ConfigError as e:
        raise ConfigError(e if str(e).startswith(source) else f"{source}: {e}") from None
    return config


def shipped_configs() -> dict[str, Path]:
    """The configs that ship with mlc (configs/ in the repository, the package mlc.configs
    when installed), by name."""
    try:  # a folder without __init__.py: files() may be a MultiplexedPath, not a Path
        found = [Path(str(p)) for p in importlib.resources.files("mlc.configs").iterdir()]
    except ModuleNotFoundError:  # a source checkout on sys.path, not installed
        found = list((Path(__file__).resolve().parents[1] / "configs").iterdir())
    return {p.stem: p for p in sorted(found) if p.suffix == ".yaml"}


def find_config(name_or_path: str | Path) -> Path:
    """A config file: an existing path, else a shipped config's name ("demo", "demo.yaml")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if str(path.parent) in (".", "configs") and name in shipped:
        return shipped[name]
    raise ConfigError(
        f"{name_or_path}: no such config file, and not a shipped config "
        f"({', '.join(shipped) or 'none found'})"
    )


def to_yaml(config: Config) -> str:
    """The config as YAML that load_config reads back to the same config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The config of a YAML file or a shipped config's name, with ``--set`` overrides."""
    config = Config()
    if path is not None:
        path = find_config(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {data!r}")
        try:
            _apply(config, migrate(data, str(path)), "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for text in overrides:
        try:
            _apply(config, parse_override(text), "")
        except ConfigError as e:
            message = str(e)
            where = message if message.startswith("--set") else f"--set {text}: {e}"
            raise ConfigError(where) from None
    check(config)
    return config


def loader_problem(c: LoaderConfig) -> str | None:
    """What is wrong with loader settings, or None."""
    if c.mode not in ("train", "eval"):
        return f"mode must be 'train' or 'eval', got {c.mode!r}"
    for key in ("batch_size", "image_size"):
        if getattr(c, key) < 1:
            return f"{key} must be >= 1, got {getattr(c, key)}"
    if c.channels not in (1, 3):
        return f"channels must be 1 or 3, got {c.channels}"
    if c.num_workers < 0 or c.retries < 0 or c.shuffle_buffer < 0:
        return "num_workers, retries and shuffle_buffer must be >= 0"
    if len(c.crop_scale) != 2 or not 0 < c.crop_scale[0] <= c.crop_scale[1] <= 1:
        return f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {c.crop_scale}"
    if not 0 < c.crop_fraction <= 1:
        return f"crop_fraction must be in (0, 1], got {c.crop_fraction}"
    return None


def check(config: Config) -> None:
    problem = loader_problem(config.data)
    if problem:
        raise ConfigError(f"data.{problem}")
    if not 0 <= config.data.max_lost_fraction <= 1:
        raise ConfigError("data.max_lost_fraction must be in [0, 1]")
    if config.optim.name not in ("sgd", "rmsprop", "adamw"):
        raise ConfigError(f"optim.name must be sgd, rmsprop or adamw, got {config.optim.name!r}")
    if config.train.precision not in PRECISIONS:
        raise ConfigError(
            f"train.precision must be {', '.join(PRECISIONS)}, got {config.train.precision!r}"
        )
    problem = device_problem(config.train.device)
    if problem:
        raise ConfigError(f"train.device {problem}")
    for key in ("samples", "log_every", "eval_every", "checkpoint_every"):
        if getattr(config.train, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1")
    if not 0 <= config.train.ema_decay < 1:
        raise ConfigError("train.ema_decay must be in [0, 1)")
    if not isinstance(config.train.tensorboard, bool) and config.train.tensorboard != "auto":
        raise ConfigError(
            f"train.tensorboard must be auto, true or false, got {config.train.tensorboard!r}"
        )
    if config.train.mode not in ("sync", "async"):
        raise ConfigError(f"train.mode must be sync or async, got {config.train.mode!r}")
    if config.train.mode == "async":
        _check_async(config)


def _check_async(config: Config) -> None:
    ps = config.ps
    for key in ("servers", "workers", "pull_every", "nodes", "threads"):
        if getattr(ps, key) < 1:
            raise ConfigError(f"ps.{key} must be >= 1")
    if ps.push_in_flight < 0:
        raise ConfigError("ps.push_in_flight must be >= 0")
    if ps.restart_workers < 0:
        raise ConfigError("ps.restart_workers must be >= 0")
    # RPC ids are 16-bit: a replacement takes the id servers + workers * restart + slot
    if ps.servers + ps.workers * (ps.restart_workers + 1) > 32768:
        raise ConfigError("ps.restart_workers: servers + workers x (restarts + 1) must be <= 32768")
    if ps.max_staleness is not None and ps.max_staleness < 0:
        raise ConfigError("ps.max_staleness must be >= 0 (or null: no limit)")
    if not 0 <= ps.node_rank < ps.nodes:
        raise ConfigError(f"ps.node_rank must be in [0, ps.nodes), got {ps.node_rank}")
    if not 0 <= ps.port < 65536:
        raise ConfigError(f"ps.port must be in [0, 65535], got {ps.port}")
    if ps.nodes > 1 and ps.port == 0:
        raise ConfigError("ps.port: several machines need a fixed rendezvous port")
    for key in ("rpc_timeout", "start_timeout", "stop_timeout"):
        if not getattr(ps, key) > 0:
            raise ConfigError(f"ps.{key} must be > 0 seconds")
    if config.train.ema_decay:
        raise ConfigError("train.ema_decay: the async mode keeps no EMA (set it to 0)")
    if config.train.precision == "fp16":
        raise ConfigError("train.precision: the async mode supports fp32 and bf16, not fp16")
    if config.train.device.startswith("cuda"):
        raise ConfigError(
            f"train.device={config.train.device}: the async mode runs its servers and workers on "
            "the CPU (train.device auto or cpu); train on GPUs with train.mode=sync (DDP)"
        )
    if config.train.compile:
        raise ConfigError("train.compile: the async mode runs eager (set it to false)")


def to_dict(config: Config) -> dict:
    """The config as plain data, without the per-split loader mode (config_from_dict reads it)."""
    data = dataclasses.asdict(config)
    del data["data"]["mode"]
    return data


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default (unless its text already says it), and keeps the
    line breaks of descriptions and epilogs."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == []:
            return text
        if default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


class UsageError(ValueError):
    """Options of a command that do not go together; `mlc` prints it on one line, exit 2."""


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    return _int_at_least(text, 0)


def unit_interval(text: str) -> float:
    """An argparse type: a number from 0 to 1 (a fraction, a probability)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def add_pass_arguments(group, workers: str) -> None:
    """The options of a scoring pass over images that `mlc eval` and `mlc predict` share."""
    group.add_argument(
        "--batch-size", type=positive_int, default=256, metavar="N", help="images per forward"
    )
    group.add_argument(
        "--workers",
        type=nonnegative_int,
        metavar="N",
        help=f"{workers} (default: the training config's; on 2 cores 0 is fastest)",
    )
    group.add_argument("--no-fold", action="store_true", help="keep batch norm unfolded (slower)")
    group.add_argument(
        "--device",
        default="auto",
        type=_device,
        metavar="auto|cpu|cuda|cuda:N",
        help="where the network runs (auto: the GPU when torch sees one; under torchrun "
        "cuda:LOCAL_RANK)",
    )
    group.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="the forward's precision; auto: bf16 autocast on GPUs with bf16 (fp16 on older "
        "ones), on CPUs what train.precision's auto picks (docs/training.md)",
    )
    group.add_argument(
        "--processes",
        type=positive_int,
        default=1,
        metavar="N",
        help="local processes sharing the images, each with cores/N threads: on a CPU one "
        "decodes while another runs its forward pass; each costs a process start-up, so it "
        "pays off on long passes (docs/eval.md)",
    )


def _device(text: str) -> str:
    """An argparse type: a device name (auto, cpu, cuda, cuda:N)."""
    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value
