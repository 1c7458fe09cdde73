"""Scorer for ``kind: lm_eval``: an lm-eval built-in task run on the model already loaded by ``lnull evaluate``.

``bench['task']`` names the task (nq_open, triviaqa, webqs, arc_easy, ...).  ``dataset: hub`` runs the
task as lm-eval ships it (its hub dataset, limited to ``eval.limit``).  Anything else is loaded by
``ctx.records`` (``asset:<name>/<split>``, a local jsonl; already limited), written to
``<work_dir>/<task>.jsonl`` and swapped in by a generated task ``lnull_<task>`` whose YAML ``include:``s the
built-in one and overrides only the data files and splits, so prompts, stop strings, filters and metrics
stay lm-eval's.  The records must use the hub's field names (``lnull assets`` writes them so).

Data differences to know: lm-eval's ``triviaqa`` evaluates the hub's ``rc.nocontext`` *validation* split
(17,944 questions); the offline asset is DPR's open-domain *test* split (11,313 questions, TriviaQA's
unfiltered dev set), so TriviaQA numbers from the two sources are not interchangeable.  ``nq_open``
(3,610) and ``webqs`` (2,032) are the same test questions as on the hub.  BOS: see ``_explicit_bos_lm``.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import json
import re
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any, Optional

from lnull.errors import ConfigError
from lnull.evaluate.base import Scorer, loads_always, logits_batch, register

# The number each paper reports.  Knowledge (LoRA-Null): 0-shot exact match.  Commonsense (OPLoRA's
# forgetting tables): the paper names no variant, so we follow the usual lm-eval reporting: length-normalised
# accuracy where lm-eval defines it (ARC, HellaSwag, OBQA, PIQA), plain accuracy elsewhere.  Every metric
# lm-eval computes is kept under ``metrics`` in the record.
PRIMARY_METRIC = {
    "nq_open": "exact_match", "triviaqa": "exact_match", "webqs": "exact_match",
    "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "hellaswag": "acc_norm", "openbookqa": "acc_norm",
    "piqa": "acc_norm", "boolq": "acc", "social_iqa": "acc", "winogrande": "acc", "mmlu": "acc",
}
# lm-eval groups of one task per subject whose offline asset holds every subject in one file: scored as one task
# that includes one subject's YAML (all share the template) with the per-subject keys rendered per document, so
# the score is the group's question-weighted accuracy (lm-eval's ``mmlu`` aggregates with weight_by_size).
# 0-shot only: lm-eval draws a subject's few-shot examples from that subject's dev split, which the file lacks.
MERGED_TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "mmlu": ("mmlu_abstract_algebra", {
        "task_alias": "mmlu", "tag": None,
        "description": "The following are multiple choice questions (with answers) about "
                       "{{subject.split('_') | join(' ')}}.\n\n"}),
}
SPLIT = "test"  # the one split of a swapped-in local file
N_EXAMPLES = 3


def simple_evaluate(**kwargs: Any) -> dict[str, Any]:
    """``lm_eval.simple_evaluate(**kwargs)`` without what it prints that is not lnull's to show: a bare "Building
    contexts" progress bar per task (``lm_eval.api.task`` calls ``tqdm`` with no switch to turn it off) and
    ``git describe`` run in the current folder for its results' ``git_hash``, whose "fatal: not a git repository"
    goes straight to the terminal outside a repository (lnull records its own commit in ``provenance.json``)."""
    import lm_eval
    import lm_eval.api.task as task_module
    import lm_eval.evaluator as evaluator
    import tqdm

    with contextlib.ExitStack() as undo:
        for module, name, quiet in ((task_module, "tqdm", functools.partial(tqdm.tqdm, disable=True)),
                                    (evaluator, "get_git_commit_hash", lambda: None)):
            undo.callback(setattr, module, name, getattr(module, name))
            setattr(module, name, quiet)
        return lm_eval.simple_evaluate(**kwargs)


@functools.lru_cache(maxsize=1)
def _yaml_scan() -> tuple[dict[str, Path], frozenset[str]]:
    """({task name: YAML file}, every word in lm-eval's task YAMLs) from a text scan (~0.6 s).

    Building lm-eval's full TaskManager index parses ~14k YAML files (5-12 s here), which every run and
    test would pay; the scan finds the usual ``task: <name>`` files, and a name that is no word of any
    YAML cannot be a task, group or tag at all.
    """
    import lm_eval.tasks

    found: dict[str, Path] = {}
    words: set[str] = set()
    pattern = re.compile(r"^task:\s*['\"]?([\w.\-]+)['\"]?\s*$", re.M)
    for path in sorted(Path(lm_eval.tasks.__file__).parent.rglob("*.yaml")):
        text = path.read_text(errors="ignore")
        words.update(re.findall(r"[\w.\-]+", text))
        for name in pattern.findall(text):
            found.setdefault(name, path)
    return found, frozenset(words)


@functools.lru_cache(maxsize=1)
def _full_index() -> dict[str, Any]:
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index


def builtin_task_yaml(task: str) -> Path:
    """Path of the built-in YAML defining ``task``; ConfigError naming it when lm-eval has no such task."""
    from lm_eval.tasks._index import Kind, TaskIndex

    files, words = _yaml_scan()
    path = files.get(task)
    if path is not None:
        entry = TaskIndex.entry_from_path(path)  # lm-eval's own parse confirms the scan
        if entry is not None and entry.name == task and entry.kind == Kind.TASK:
            return path
    # names the scan cannot place (groups, tags, tasks declared otherwise): lm-eval's full index decides
    entry = _full_index().get(task) if task in words else None
    if entry is not None and entry.kind == Kind.TASK and entry.yaml_path is not None:
        return Path(entry.yaml_path)
    if entry is not None:
        raise ConfigError(f"lm-eval '{task}' is a {entry.kind.name.lower()}, not a single task; name one task")
    close = difflib.get_close_matches(task, list(files), n=3)
    raise ConfigError(f"unknown lm-eval task '{task}'" + (f"; did you mean {', '.join(close)}?" if close else ""))


def _explicit_bos_lm(model: Any, tokenizer: Any, batch_size: int, add_bos: bool,
                     max_gen_toks: Optional[int] = None) -> Any:
    """An lm-eval HFLM on the loaded model whose BOS handling is exactly ``add_bos``; ``max_gen_toks`` (None:
    lm-eval's default, 256) is the most tokens it generates for a task that sets none itself.

    HFLM's ``add_bos_token`` only sets the tokenizer's ``add_special_tokens``; tokenizers without a BOS
    post-processor (SmolLM2's, the tiny one) then add nothing.  This subclass prepends the BOS id itself, as
    lnull's own generation does, so ``add_bos`` means the same for every scorer.
    """
    import torch
    from lm_eval.models.huggingface import HFLM

    from lnull.console import adopt_library_loggers

    adopt_library_loggers()  # lm-eval's and datasets' messages (imported by now) to the stage log, not the console

    class ExplicitBosHFLM(HFLM):
        # no lm-eval progress bar per request batch: the console shows lnull's line per benchmark
        def loglikelihood(self, requests: list, disable_tqdm: bool = True) -> list:
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = True) -> list:
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests: list, disable_tqdm: bool = True) -> list:
            return super().generate_until(requests, disable_tqdm=True)

        @property
        def max_gen_toks(self) -> int:  # HFLM's is a constant property (no constructor argument sets it)
            return super().max_gen_toks if max_gen_toks is None else int(max_gen_toks)

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                       **kwargs: Any) -> list[int]:
            ids = self.tokenizer.encode(string, add_special_tokens=False)
            if add_special_tokens is not False and add_bos and self.tokenizer.bos_token_id is not None:
                ids = [self.tokenizer.bos_token_id] + ids
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def tok_batch_encode(self, strings: list[str], padding_side: str = "left",
                             left_truncate_len: int | None = None, truncation: bool = False):
            rows = [self.tok_encode(s, left_truncate_len=left_truncate_len) for s in strings]
            width, pad = max(len(r) for r in rows), self.tokenizer.pad_token_id
            left = padding_side == "left"
            ids = [([pad] * (width - len(r)) + r) if left else (r + [pad] * (width - len(r))) for r in rows]
            mask = [([0] * (width - len(r)) + [1] * len(r)) if left else ([1] * len(r) + [0] * (width - len(r)))
                    for r in rows]
            return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    return ExplicitBosHFLM(pretrained=model, tokenizer=tokenizer, batch_size=logits_batch(batch_size, model),
                           add_bos_token=add_bos)


def _local_task(task: str, builtin: Path | None, rows: list[dict[str, Any]], work_dir: Path,
                hf_cache: Path | None = None, name: str | None = None,
                overrides: dict[str, Any] | None = None) -> tuple[str, Path]:
    """Write ``rows`` and a YAML task ``name`` (default ``lnull_<task>``) that includes ``builtin`` (None: a
    standalone task) with the data swapped in and any other task keys replaced by ``overrides``.

    Returns (task name, folder to pass as lm-eval's include_path).  Few-shot examples, if asked for, come
    from the same file (lm-eval then skips the document being scored), as the offline assets have no train
    split; at 0 shots the split is never read.  ``hf_cache``: where the json builder writes its Arrow copy.
    """
    import yaml

    data = work_dir / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    folder = work_dir / "lm_eval_tasks"
    folder.mkdir(parents=True, exist_ok=True)
    name = name or f"lnull_{task}"
    kwargs = {"data_files": {SPLIT: str(data)}, **({"cache_dir": str(hf_cache)} if hf_cache else {})}
    config = {**({"include": str(builtin)} if builtin else {}), "task": name, "dataset_path": "json",
              "dataset_name": None, "dataset_kwargs": kwargs,
              "training_split": None, "validation_split": None, "test_split": SPLIT, "fewshot_split": SPLIT,
              **(overrides or {})}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return name, folder


def _examples(samples: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """First logged samples: prompt, target, prediction (generated text, or for multiple choice the index
    of the highest raw log-likelihood) and the sample's primary metric."""
    out = []
    for s in samples[:N_EXAMPLES]:
        args = s.get("arguments")
        first = args[0] if isinstance(args, list) else next(iter(args.values()))
        prompt = first[0] if isinstance(first, (list, tuple)) else next(iter(first.values()))
        pred, extra = s.get("filtered_resps"), {}
        if pred and isinstance(pred[0], (list, tuple)):  # multiple choice: (loglikelihood, is_greedy) per choice
            extra["loglikelihoods"] = [float(p[0]) for p in pred]
            pred = extra["loglikelihoods"].index(max(extra["loglikelihoods"]))
        elif isinstance(pred, list) and len(pred) == 1:
            pred = pred[0]
        out.append({"prompt": prompt, "target": s.get("target"), "prediction": pred, metric: s.get(metric), **extra})
    return out


def score(name: str, bench: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """lm-eval's score (in %) of ``bench['task']`` on ``ctx.model``; n = documents scored."""
    from lm_eval.tasks import TaskManager

    task = bench.get("task")
    if not task:
        raise ConfigError(f"eval.benchmarks.{name}.task (the lm-eval task name) is not set")
    included, overrides = MERGED_TASKS.get(task, (task, None))
    builtin = builtin_task_yaml(included)
    hub = bench.get("dataset") == "hub"
    if not hub and not bench.get("dataset"):
        raise ConfigError(f"eval.benchmarks.{name}.dataset is not set (asset:<name>/<split>, a jsonl, or hub)")
    check_merged(name, bench)
    # the json builder's Arrow copy of a local file is scratch: a temp folder, not the run or ~/.cache
    with tempfile.TemporaryDirectory(prefix="lnull-lm-eval-") as hf_cache:
        if hub:
            spec, manager, limit = str(builtin), TaskManager(include_defaults=False), ctx.limit(bench)
        else:
            try:
                rows = ctx.records(bench)
            except (FileNotFoundError, ValueError) as err:  # missing / unknown asset: one clear line
                raise ConfigError(f"eval.benchmarks.{name}: {err}") from None
            spec, folder = _local_task(task, builtin, rows, ctx.work_dir, Path(hf_cache), overrides=overrides)
            manager, limit = TaskManager(include_path=str(folder), include_defaults=False), None
        seed = ctx.eval_cfg["seed"]
        # eval.max_new_tokens (demo scale) caps generation here too, as it does for lnull's own scorers
        lm = _explicit_bos_lm(ctx.model, ctx.tokenizer, ctx.eval_cfg["batch_size"], ctx.add_bos,
                              ctx.eval_cfg.get("max_new_tokens"))
        try:
            out = simple_evaluate(
                model=lm, tasks=[spec], num_fewshot=bench.get("num_fewshot", 0), limit=limit, task_manager=manager,
                log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed, bootstrap_iters=1000)  # stderr of mean metrics is closed-form anyway
        except ConnectionError as err:
            if not hub:
                raise
            raise ConfigError(f"eval.benchmarks.{name}: dataset 'hub' needs the hub ({err}); offline, use "
                              f"asset:<name>/<split> from `lnull assets`") from None
    key = next(iter(out["results"]))
    config = out["configs"][key]
    names = [m["metric"] for m in config.get("metric_list", [])]
    metrics: dict[str, float] = {}  # "<metric>,<filter>" -> metric, first filter wins (one filter per task here)
    stderrs: dict[str, float] = {}
    for k, v in out["results"][key].items():
        metric = k.partition(",")[0]
        if metric in names and isinstance(v, (int, float)):
            metrics.setdefault(metric, 100.0 * v)
        if metric.endswith("_stderr") and metric[:-len("_stderr")] in names and isinstance(v, (int, float)):
            stderrs.setdefault(metric[:-len("_stderr")], 100.0 * v)
    primary = PRIMARY_METRIC.get(task) if PRIMARY_METRIC.get(task) in metrics else names[0]
    gen = config.get("generation_kwargs") or {}
    samples = out.get("samples", {}).get(key, [])
    return {"metric": primary, "value": metrics[primary], "n": out["n-samples"][key]["effective"],
            "stderr": stderrs.get(primary), "metrics": metrics, "task": task, "task_version": out["versions"][key],
            "lm_eval_version": version("lm_eval"),
            "data": "hub" if hub else bench["dataset"], "lm_eval_dataset": config.get("dataset_path"),
            "settings": ctx.settings(num_fewshot=bench.get("num_fewshot", 0), output_type=config.get("output_type"),
                                     doc_to_text=config.get("doc_to_text"), description=config.get("description"),
                                     generation_kwargs=config.get("generation_kwargs"),
                                     max_gen_toks=gen.get("max_gen_toks", lm.max_gen_toks) if gen else None),
            "examples": _examples(samples, primary)}


def check_task_named(name: str, bench: Any, ev: Any) -> None:
    """Compose time: ``task`` names the lm-eval task."""
    if not bench["task"]:
        raise ConfigError(f"eval.benchmarks.{name}.task (the lm-eval task name) is not set")


def check_merged(name: str, bench: Any) -> None:
    """A :data:`MERGED_TASKS` task runs on a local file of every subject, 0-shot (ConfigError otherwise)."""
    if bench["task"] not in MERGED_TASKS:
        return
    if bench.get("dataset") == "hub":
        raise ConfigError(f"eval.benchmarks.{name}: lm-eval's '{bench['task']}' is a group of one task per subject; "
                          f"use the offline file of all of them (asset:{bench['task']}/test from `lnull assets`)")
    if bench.get("num_fewshot"):
        raise ConfigError(f"eval.benchmarks.{name}.num_fewshot: '{bench['task']}' runs 0-shot here (lm-eval takes "
                          "each subject's few-shot examples from its dev split, which the offline file lacks)")


def check_task_exists(name: str, bench: Any, cache_dir: Any, ev: Any) -> None:
    """Before any model loads: lm-eval knows the task (ConfigError naming close names)."""
    check_merged(name, bench)
    builtin_task_yaml(MERGED_TASKS.get(bench["task"], (bench["task"],))[0])


# version 2: eval.max_new_tokens caps lm-eval's generation (version 1 generated up to lm-eval's 256 under a cap)
register(Scorer(kind="lm_eval", score=score, version="2", packages=("lm_eval",), needs_weights=loads_always,
                check=check_task_named, check_inputs=check_task_exists,
                description="an lm-eval task (its metric), local data swapped in through a generated task"))
