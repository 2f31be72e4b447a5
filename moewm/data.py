"""Prompts and input texts: the prompts file shipped in conf/, a user's text / JSONL file, or a HF dataset."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from moewm.config import ConfigError, DataConfig

BUILTIN_PROMPTS = Path(__file__).resolve().parent.parent / "conf" / "data" / "prompts.txt"


@dataclass
class TextRecord:
    text: str
    prompt: Optional[str] = None
    # Token ids of the text (and of its prompt) exactly as a model produced them: detection then skips
    # tokenising again, which need not give back the same tokens.
    ids: Optional[list[int]] = None
    prompt_ids: Optional[list[int]] = None


def _id_list(value: object, where: str, name: str) -> Optional[list[int]]:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ConfigError(f"{where}: {name!r} must be a list of non-negative integer token ids")
    return list(value)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; a byte that is not UTF-8 is a ConfigError naming the file and line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(
                    f"{path}:{number}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                    "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None


def read_records(path: str | Path, text_field: str = "text") -> list[TextRecord]:
    """Plain text (one text per line, blank lines skipped) or JSONL with ``text_field`` and optional
    ``prompt``, ``ids`` and ``prompt_ids`` (token ids to score as they are)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"input/data.path={str(path)!r}: no such file")
    records = []
    is_jsonl = path.suffix in (".jsonl", ".json")
    for number, line in _lines(path):
        if not line.strip():
            continue
        if is_jsonl:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or (text_field not in row and "ids" not in row):
                raise ConfigError(f"{path}:{number}: a JSONL row needs a {text_field!r} field (or token 'ids')")
            where = f"{path}:{number}"
            records.append(TextRecord(str(row.get(text_field, "")), row.get("prompt"),
                                      _id_list(row.get("ids"), where, "ids"), _id_list(row.get("prompt_ids"), where, "prompt_ids")))
        else:
            records.append(TextRecord(line.rstrip("\r\n")))
    if not records:
        raise ConfigError(f"input/data.path={str(path)!r}: the file holds no texts")
    return records


def _cut(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


def load_prompts(cfg: DataConfig) -> list[str]:
    """``data.num_prompts`` prompts (cycling is refused: too few prompts is an error, not a silent repeat)."""
    cfg.validate()
    if cfg.source == "builtin":
        texts = [r.text for r in read_records(BUILTIN_PROMPTS)]
    elif cfg.source == "file":
        texts = [r.prompt or _cut(r.text, cfg.prompt_words) for r in read_records(cfg.path, cfg.text_field)]  # type: ignore[arg-type]
    else:
        try:
            import datasets
        except ImportError:
            raise ConfigError("data.source=hf needs the `datasets` package: pip install -e '.[data]'") from None
        try:
            ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config, split=cfg.hf_split)
        except Exception as err:  # offline, unknown name, ...
            raise ConfigError(f"data.hf_name={cfg.hf_name!r}: could not load the dataset ({type(err).__name__}: {err})") from None
        if cfg.text_field not in ds.column_names:
            raise ConfigError(f"data.text_field={cfg.text_field!r}: the dataset has columns {ds.column_names}")
        texts = [_cut(t, cfg.prompt_words) for t in ds.select(range(min(len(ds), cfg.num_prompts * 4)))[cfg.text_field] if t and t.strip()]
    texts = [t for t in texts if t.strip()]
    if len(texts) < cfg.num_prompts:
        raise ConfigError(f"data.num_prompts={cfg.num_prompts}: allowed range is [1, {len(texts)}] (prompts available from data.source={cfg.source})")
    return texts[: cfg.num_prompts]
