"""lm-eval against the live server on a local multiple-choice task (no hub): loglikelihood through
`local-completions` (echo + logprobs) and generate_until through `local-chat-completions`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import API_KEY, Server

QUESTIONS = [
    ("The sky on a clear day is", ["blue", "green", "purple"], 0),
    ("Two plus two equals", ["four", "seven", "ten"], 0),
    ("The opposite of hot is", ["cold", "loud", "tall"], 0),
]
TASK = """task: pagedllm_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN_TASK = """task: pagedllm_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / "pagedllm_mc.yaml").write_text(TASK.format(data=data))
    (folder / "pagedllm_gen.yaml").write_text(GEN_TASK.format(data=data))
    return folder


def evaluate(model: str, model_args: dict, task: str, tasks_dir: Path, **kwargs) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ["OPENAI_API_KEY"] = API_KEY
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task],
        task_manager=TaskManager(include_path=str(tasks_dir)),
        **kwargs,
    )
    return results["results"][task]


def test_loglikelihood_multiple_choice(server: Server, model_name: str, tokenizer_dir: Path, tasks_dir: Path) -> None:
    args = {
        "model": model_name,
        "base_url": f"{server.base_url}/v1/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": str(tokenizer_dir),
        "num_concurrent": 1,
        "max_retries": 1,
    }
    result = evaluate("local-completions", args, "pagedllm_mc", tasks_dir)
    assert 0.0 <= result["acc,none"] <= 1.0
    assert result["acc,none"] >= 2 / 3  # the model knows these


def test_generate_until_with_chat(server: Server, model_name: str, tasks_dir: Path) -> None:
    args = {
        "model": model_name,
        "base_url": f"{server.base_url}/v1/chat/completions",
        "tokenizer_backend": "none",
        "num_concurrent": 1,
        "max_retries": 1,
    }
    result = evaluate("local-chat-completions", args, "pagedllm_gen", tasks_dir, apply_chat_template=True)
    assert 0.0 <= result["exact_match,none"] <= 1.0
