"""Task presets for `titan-rw eval --tasks PRESET` and the paper-style comparison table.

`paper`: the 19 lm-eval tasks of the paper's Tables 8-11 (Appendix A.3) — 13 language
understanding and reasoning (LUR) tasks and 6 question-answering (QA) tasks. Appendix A.2 /
Section 6 give 5 shots for the QA tasks; the LUR shots are not stated, so they run with
lm-eval's defaults (0-shot; tinyArc 25 and tinyWinogrande 5 as in their lm-eval configs).
`local`: the two shipped tasks built from the embedded corpus (no download).

Each entry: (lm-eval task or group, shots, the metric reported in the table, the paper's label).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    task: str
    num_fewshot: int | None  # None: the task's own default
    metric: str  # lm-eval metric name (without ",none")
    label: str
    group: str = ""  # "LUR" / "QA" / "local"


PAPER_LUR = [
    TaskSpec("arc_challenge", 0, "acc", "ARC Challenge", "LUR"),
    TaskSpec("arc_easy", 0, "acc", "ARC Easy", "LUR"),
    TaskSpec("copa", 0, "acc", "COPA", "LUR"),
    TaskSpec("lambada_openai", 0, "acc", "Lambada (OpenAI)", "LUR"),
    TaskSpec("lambada_standard", 0, "acc", "Lambada (Standard)", "LUR"),
    TaskSpec("mmlu", 0, "acc", "MMLU", "LUR"),
    TaskSpec("mnli", 0, "acc", "MNLI", "LUR"),
    TaskSpec("mnli_mismatch", 0, "acc", "MNLI (mismatch)", "LUR"),
    TaskSpec("rte", 0, "acc", "RTE", "LUR"),
    TaskSpec("sst2", 0, "acc", "SST-2", "LUR"),
    TaskSpec("tinyArc", 25, "acc_norm", "TinyARC", "LUR"),
    TaskSpec("tinyWinogrande", 5, "acc_norm", "TinyWinoGrande", "LUR"),
    TaskSpec("winogrande", 0, "acc", "WinoGrande", "LUR"),
]
PAPER_QA = [
    TaskSpec("boolq", 5, "acc", "BoolQ", "QA"),
    TaskSpec("logiqa", 5, "acc", "LogiQA", "QA"),
    TaskSpec("logiqa2", 5, "acc", "LogiQA2", "QA"),
    TaskSpec("sciq", 5, "acc", "SciQ", "QA"),
    TaskSpec("social_iqa", 5, "acc", "SocialQA", "QA"),
    TaskSpec("triviaqa", 5, "exact_match", "TriviaQA (Exact Match)", "QA"),
]
LOCAL = [
    TaskSpec("titan_rw_local_mc", 0, "acc", "Local continuation (MC)", "local"),
    TaskSpec("titan_rw_local_ppl", 0, "bits_per_byte", "Local rolling loglikelihood", "local"),
]
PRESETS: dict[str, list[TaskSpec]] = {
    "paper": PAPER_LUR + PAPER_QA,
    "paper_lur": PAPER_LUR,
    "paper_qa": PAPER_QA,
    "local": LOCAL,
}
KNOWN: dict[str, TaskSpec] = {s.task: s for specs in PRESETS.values() for s in specs}
# Metrics where a lower value is better (the compare table flips the sign of "better").
LOWER_IS_BETTER = {"bits_per_byte", "byte_perplexity", "word_perplexity", "perplexity"}
# Extra packages some paper tasks need at metric time (checked before a long run starts).
TASK_PACKAGES = {"tinyArc": "tinyBenchmarks", "tinyWinogrande": "tinyBenchmarks"}


def expand(tasks: str | list[str], num_fewshot: int | None = None) -> list[TaskSpec]:
    """`paper`, `local`, `paper,local`, `boolq,arc_easy` or a mix → TaskSpecs (order kept, no repeats).

    `num_fewshot`, when given, overrides every task's shots."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[TaskSpec] = []
    seen = set()
    for name in (n.strip() for n in names):
        if not name:
            continue
        specs = PRESETS.get(name) or [KNOWN.get(name) or TaskSpec(name, None, "", name)]
        for s in specs:
            if s.task in seen:
                continue
            seen.add(s.task)
            if num_fewshot is not None:
                s = TaskSpec(s.task, num_fewshot, s.metric, s.label, s.group)
            out.append(s)
    return out
