"""What a scorer gets: the loaded model, its tokenizer, the run config and a scratch folder."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from lnull.data.sources import load_records, require_fields
from lnull.evaluate.generate import generate


def read_saved_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a jsonl cache a scorer appends to line by line; a line cut short by a kill is dropped."""
    rows = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


@dataclass
class EvalContext:
    """One evaluated model.

    ``which``: base | init | trained | a model path; ``identity``: the folder (or hub name) the weights
    came from (the adapter folder when there is one); ``base_path`` / ``adapter_path``: the model folder (or
    hub name) and the PEFT adapter folder loaded on it (None without one); ``init_adapter_path``: the run's
    ``init/adapter`` whose s B0 A0 the weights of ``base_path`` lose first (the residual model, ``lnull.residual``;
    None: ``base_path`` as it is); ``work_dir``: the record's scratch
    folder in the store (kept when a run is killed, so scorers may cache generations there).
    """

    model: Any
    tokenizer: Any
    cfg: dict[str, Any]
    which: str
    identity: str
    work_dir: Path
    base_path: str = ""
    adapter_path: Optional[str] = None
    init_adapter_path: Optional[str] = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def eval_cfg(self) -> dict[str, Any]:
        return self.cfg["eval"]

    @property
    def add_bos(self) -> bool:
        return bool(self.cfg["model"]["add_bos"])

    def limit(self, bench: dict[str, Any]) -> Optional[int]:
        """Items to score of ``bench``: its own ``limit``, else ``eval.limit`` (None: all)."""
        return bench.get("limit") or self.eval_cfg["limit"]

    def records(self, bench: dict[str, Any], fields: Sequence[str] = ()) -> list[dict[str, Any]]:
        """The benchmark's records, first :meth:`limit` of them; ConfigError if a field is missing."""
        rows = load_records(bench["dataset"], self.cfg.get("cache_dir"), self.limit(bench))
        require_fields(rows, list(fields), bench["dataset"])
        return rows

    def generate(self, prompts: list[str], max_new_tokens: int, stop: Sequence[str] = (), temperature: float = 0.0,
                 top_p: float = 1.0, seed: Optional[int] = None, desc: str = "generate",
                 max_length: Optional[int] = None) -> list[str]:
        """Completions with the configured engine (at most ``eval.max_new_tokens`` new tokens when set); wall
        time accumulates in ``timings['generate_s']``."""
        if self.eval_cfg.get("max_new_tokens"):
            max_new_tokens = min(max_new_tokens, self.eval_cfg["max_new_tokens"])
        start = time.perf_counter()
        if self.eval_cfg["engine"] == "vllm":
            from lnull.evaluate.vllm_engine import generate_vllm

            outs = generate_vllm(self, prompts, max_new_tokens, stop, temperature, top_p,
                                 self.eval_cfg["seed"] if seed is None else seed, max_length)
        else:
            outs = generate(self.model, self.tokenizer, prompts, max_new_tokens, stop, self.eval_cfg["batch_size"],
                            self.add_bos, self.cfg["progress"], temperature, top_p,
                            self.eval_cfg["seed"] if seed is None else seed, desc, max_length)
        self.timings["generate_s"] = self.timings.get("generate_s", 0.0) + time.perf_counter() - start
        return outs

    def settings(self, **extra: Any) -> dict[str, Any]:
        """Generation settings every record carries, plus the scorer's own."""
        return {"engine": self.eval_cfg["engine"], "add_bos": self.add_bos, "batch_size": self.eval_cfg["batch_size"],
                "seed": self.eval_cfg["seed"], "max_new_tokens_cap": self.eval_cfg.get("max_new_tokens"), **extra}
