"""Typed configuration: the Personalize HRNN hyperparameters and the featurization options.

Every setting object here is a dataclass; `load_config` fills one from (in rising priority)
its defaults, a JSON/TOML file, environment variables `<PREFIX><FIELD>` and explicit
overrides (command-line flags). Values are coerced to the field's type and range-checked.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import tomllib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from model.errors import ConfigError

T = TypeVar("T")

VARIANTS = ("hrnn-init", "hrnn-all", "session-only")
LOSSES = ("top1", "bpr-max", "cross-entropy")
OPTIMIZERS = ("adagrad", "adam")
# One user's state is one changelog record: its last H stepped events and last H skipped ones (UserState.skipped),
# each with an item id and an event type of up to 256 characters (1 KiB in UTF-8), encode to at most ~875 KB at
# H = 200 (tests/test_config.py builds that case), below Kafka's 1 MB record limit. A larger record failed its
# batch on every restart of the worker, and the partition stopped for good.
MAX_HISTORY_LENGTH = 200
PUBLISHED_MAX_HISTORY_LENGTH = 10_000  # the bound before it: versions published then stay loadable


@dataclass
class DataConfig:
    """How an interactions log becomes training sequences (Personalize 'featurization')."""

    session_timeout_s: float = 1800.0
    whole_history_session: bool = False  # transaction-only data: a user's history is one session
    event_types: tuple[str, ...] = ()  # keep only these types (empty: all)
    event_type_weights: dict[str, float] = field(default_factory=dict)  # loss weight per type
    min_user_history_length_percentile: float = 0.0
    max_user_history_length_percentile: float = 0.99
    min_item_support: int = 1
    collapse_repeats: bool = False  # merge consecutive events of the same item in a session

    def validate(self) -> None:
        _in_range("session_timeout_s", self.session_timeout_s, 1, 365 * 86400)
        _in_range("min_user_history_length_percentile", self.min_user_history_length_percentile, 0.0, 1.0)
        _in_range("max_user_history_length_percentile", self.max_user_history_length_percentile, 0.0, 1.0)
        if self.min_user_history_length_percentile >= self.max_user_history_length_percentile:
            raise ConfigError("min_user_history_length_percentile must be below max_user_history_length_percentile")
        _in_range("min_item_support", self.min_item_support, 1, 10**9)
        for name, w in self.event_type_weights.items():
            _in_range(f"event_type_weights[{name!r}]", w, 0.0, 1000.0)  # a loss weight: NaN/inf poison the model


@dataclass
class HRNNConfig:
    """The network and its training. Names and defaults of the Personalize aws-hrnn recipe where it has them."""

    variant: str = "hrnn-init"
    hidden_dimension: int = 43
    bptt: int = 32
    recency_mask: bool = True
    recency_half_life_days: float = 0.0  # 0: a quarter of the training time span
    embedding_dimension: int = 0  # 0: same as hidden_dimension
    tied_embeddings: bool = False  # output layer reuses the input item embeddings
    dropout_embedding: float = 0.0
    dropout_session: float = 0.1
    dropout_user: float = 0.1
    dropout_init: float = 0.1
    time_gap_input: bool = False  # feed log(1 + seconds since the user's previous event)
    predict_session_start: bool = True  # also train on the first item of a session, from the user state
    optimizer: str = "adam"
    learning_rate: float = 0.005
    # > 0: validate and publish a moving average of the weights over about this many epochs of steps, not the last step
    weight_average_epochs: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 5
    # After early stopping: train again from scratch on every training event, the validation sessions
    # (each user's latest) included, for the best epoch count; the served model learns the freshest behaviour.
    refit: bool = True
    # > 0: first train this many networks of this config (seeds seed+1 ...), then the published one learns
    # their mean predictions too (weight distill_weight): most of an ensemble's gain at one network's serving cost
    distill_teachers: int = 0
    distill_weight: float = 1.0
    loss: str = "cross-entropy"
    n_sample: int = 256
    sample_alpha: float = 0.75
    logq: float = 1.0  # sampled-softmax popularity correction: 0 let popular items sink (plain and repeat, reddit and synth)
    bpreg: float = 1.0
    history_length: int = 100  # H: events kept per user for rebuilds and the repeat head
    repeat_head: bool = False
    window_profile: bool = True  # with repeat_head: the window's mean item embedding joins the catalogue scores
    # with repeat_head and early stopping: after training, raise the window items' scores by the offset that
    # maximizes validation MRR@20 (model.calibration; likelihood training leaves the top of the list too open)
    calibrate_window_offset: bool = True
    seed: int = 42

    def validate(self, published: bool = False) -> None:
        """Refuse a setting out of its range; `published`: the settings of a version already published, held to
        the bounds it was published under."""
        _one_of("variant", self.variant, VARIANTS)
        _one_of("loss", self.loss, LOSSES)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _in_range("hidden_dimension", self.hidden_dimension, 32, 256)
        _in_range("bptt", self.bptt, 1, 32)
        _in_range("embedding_dimension", self.embedding_dimension, 0, 1024)
        for name in ("dropout_embedding", "dropout_session", "dropout_user", "dropout_init"):
            _in_range(name, getattr(self, name), 0.0, 0.9)
        _in_range("recency_half_life_days", self.recency_half_life_days, 0.0, 36_500.0)
        _in_range("learning_rate", self.learning_rate, 1e-6, 10.0)
        _in_range("weight_decay", self.weight_decay, 0.0, 1.0)
        _in_range("weight_average_epochs", self.weight_average_epochs, 0.0, 100.0)
        _in_range("batch_size", self.batch_size, 1, 8192)
        _in_range("epochs", self.epochs, 1, 1000)
        _in_range("n_sample", self.n_sample, 0, 100_000)
        _in_range("sample_alpha", self.sample_alpha, 0.0, 1.0)  # 0: uniform samples, 1: by popularity
        _in_range("logq", self.logq, 0.0, 1.0)  # 1: the full log-popularity correction
        _in_range("bpreg", self.bpreg, 0.0, 100.0)
        _in_range("distill_teachers", self.distill_teachers, 0, 16)
        _in_range("distill_weight", self.distill_weight, 0.0, 100.0)
        _in_range("history_length", self.history_length, 1, PUBLISHED_MAX_HISTORY_LENGTH if published else
                  MAX_HISTORY_LENGTH, why="one user's state must fit a Kafka record (1 MB) on the state changelog")
        _in_range("seed", self.seed, 0, 2**32 - 1)  # numpy's and torch's generators take no negative seed
        if self.tied_embeddings and self.embedding_dimension not in (0, self.hidden_dimension):
            raise ConfigError("tied_embeddings needs embedding_dimension equal to hidden_dimension (or 0)")

    @property
    def emb_dim(self) -> int:
        return self.embedding_dimension or self.hidden_dimension


def _in_range(name: str, value: float, lo: float, hi: float, why: str = "") -> None:
    # Written so NaN fails too (every comparison with NaN is False); a bound check `value < lo` would let it pass.
    if not lo <= value <= hi:
        raise ConfigError(f"{name} = {value} is outside its range [{lo}, {hi}]" + (f": {why}" if why else ""))


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not one of {', '.join(allowed)}")


def _coerce(name: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        return _coerce(name, args[0], value)
    _refuse_wrong_kind(name, tp, origin, value)
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp in (int, float, str):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return tp(value)
        if origin is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(v).strip() for v in items if str(v).strip())
        if origin is dict:
            if isinstance(value, str):  # "click=1,purchase=3" or JSON
                value = json.loads(value) if value.strip().startswith("{") else \
                    dict(kv.split("=", 1) for kv in value.split(",") if kv.strip())
            return {str(k).strip(): _weight(name, k, v) for k, v in dict(value).items()}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from exc
    return value


def _refuse_wrong_kind(name: str, tp: Any, origin: Any, value: Any) -> None:
    """A file value of another JSON kind than the field's is a mistake, not something to convert: bool(0.5),
    float(true), list({...}) and str(null) all succeed and run with a value nobody wrote (str(null) gave every
    exactly-once worker the transactional id "None"). Strings stay accepted: environment variables and flags
    are strings by nature."""
    if tp is bool and not isinstance(value, (bool, str)):
        raise _wrong_kind(name, value, "a boolean (true or false)")
    if tp in (int, float) and isinstance(value, bool):
        raise _wrong_kind(name, value, "an integer" if tp is int else "a number")
    if tp is str and not isinstance(value, str):
        raise _wrong_kind(name, value, "a string")
    if origin is tuple:
        _refuse_wrong_names(name, value)


def _refuse_wrong_names(name: str, value: Any) -> None:
    # A list of names is text or a list of strings; str() of an item would make a name of 1, true or null.
    if isinstance(value, str):
        return
    if not isinstance(value, (list, tuple)):
        raise _wrong_kind(name, value, 'a list of names (e.g. ["click", "purchase"])')
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _wrong_kind(f"{name}[{i}]", item, "a string", whole_setting=False)


def _weight(name: str, key: Any, value: Any) -> float:
    if isinstance(value, bool):  # float(true) would be a weight of 1 nobody chose
        raise _wrong_kind(f"{name}[{str(key).strip()!r}]", value, "a number")
    return float(value)


def _wrong_kind(name: str, value: Any, wanted: str, whole_setting: bool = True) -> ConfigError:
    if value is None:  # null is no value of any kind; leaving the key out is how a file asks for the default
        hint = " (leave the key out for its default)" if whole_setting else ""
        return ConfigError(f"setting {name}: null is not {wanted}{hint}")
    shown = json.dumps(value, default=repr)  # in the file's own spelling: true, not True
    return ConfigError(f"setting {name}: {shown} is {json_kind(value)}, not {wanted}")


def unknown_setting(key: str, known: Iterable[str], where: str) -> ConfigError:
    """The error for a key that is no setting; it names the setting probably meant, since a typo would
    otherwise train silently with that setting's default."""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(known))}"
    return ConfigError(f"{where}: unknown setting {key!r} ({hint})")


def field_names(cls: type) -> set[str]:
    """The settings a config dataclass has."""
    return {f.name for f in dataclasses.fields(cls)}


def path_arg(text: str) -> str:
    """The argparse type of a flag that names a file or directory: an empty name would read as the current
    directory to pathlib (`--registry ''` published there) or as no flag at all (`--config ''` was ignored)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path: name a file or directory")
    return text


def is_utf8(text: str) -> bool:
    """Whether `text` encodes as UTF-8. Bytes that are not UTF-8 (a terminal's argument, a file name) reach Python
    as lone surrogates, which neither Kafka clients, pyarrow nor JSON can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown_path(path: str | Path, limit: int = 120) -> str:
    """A path as a message shows it: cut in the middle when very long, since a 4,000-character name would bury
    the reason beside it; both ends stay, as they tell where it was meant to be and which file."""
    text = str(path)
    if len(text) <= limit:
        return text
    keep = (limit - 3) // 2
    return f"{text[:keep]}...{text[-keep:]}"


def read_json(path: Path) -> Any:
    """A JSON file (a model version's); a ValueError where it is no JSON, as for one nested too deeply, where the
    parser runs out of stack: every caller refuses an unreadable file by OSError and ValueError."""
    text = path.read_text()
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{path.name} is nested too deeply") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {shown_path(p)}: {exc.strerror}") from None
    text = _utf8_text(p, raw)
    try:
        values = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {exc}") from None
    except RecursionError:  # the parsers recurse per level of nesting: no config needs a thousand
        raise ConfigError(f"config file {p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: nested too "
                          "deeply") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {p} holds {json_kind(values)}, not an object of settings "
                          '(e.g. {"hidden_dimension": 64})')
    return values


def _utf8_text(path: Path, raw: bytes) -> str:
    # JSON and TOML files are UTF-8 by their specs; the locale's encoding would read the same file differently
    # on another machine.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} "
                          "cannot be decoded (save the file as UTF-8)") from None


def json_kind(value: Any) -> str:
    """What a parsed JSON/TOML value is, in the file's words (for messages)."""
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def load_config(cls: type[T], *, file_values: dict[str, Any] | None = None, env_prefix: str | None = None,
                overrides: dict[str, Any] | None = None, strict_file: bool = False, validate: bool = True) -> T:
    """Build `cls` from defaults < file values < environment < overrides (None means 'not given'); then
    its `validate()`, if it has one, unless the caller checks the result itself."""
    hints = typing.get_type_hints(cls)
    names = field_names(cls)
    values: dict[str, Any] = {}
    for key, value in (file_values or {}).items():
        if key in names:
            values[key] = _coerce(key, hints[key], value)
        elif strict_file:
            raise unknown_setting(key, names, cls.__name__)
    if env_prefix:
        for key in names:
            env = os.environ.get(env_prefix + key.upper())
            if env is not None:
                values[key] = _coerce(key, hints[key], env)
    for key, value in (overrides or {}).items():
        if value is not None and key in names:
            values[key] = _coerce(key, hints[key], value)
    obj = cls(**values)
    check = getattr(obj, "validate", None) if validate else None
    if check:
        check()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(obj)))
