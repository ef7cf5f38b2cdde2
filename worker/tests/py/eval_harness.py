"""lm-evaluation-harness against the gateway (run by tests/eval_harness.rs): its `local-completions` model, unmodified,
runs a loglikelihood task and a generate_until task from a small local dataset (nothing from the hub), and each
loglikelihood it gets through the OpenAI API equals transformers' on the same checkpoint.

Usage: eval_harness.py BASE MODEL MODEL_DIR WORK_DIR. Exits non-zero, naming the check, on the first failure.
"""

import json
import os
import sys

BASE, MODEL, MODEL_DIR, WORK = sys.argv[1:5]
# Nothing from the hub, and the dataset's cache in the test's own directory (deleted with it), not ~/.cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["HF_DATASETS_CACHE"] = os.path.join(WORK, "datasets-cache")

import lm_eval  # noqa: E402
import torch  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import AutoTokenizer, GPTJForCausalLM  # noqa: E402

TOLERANCE = 1e-3
ITEMS = [
    {"context": "The capital of France is", "continuation": " Paris"},
    {"context": "One, two, three,", "continuation": " four, five"},
    {"context": "The quick brown fox jumps over the", "continuation": " lazy dog"},
    {"context": "Water boils at", "continuation": " 100 degrees"},
    {"context": "Roses are red, violets are", "continuation": " blue"},
    {"context": "To be or not to be,", "continuation": " that is the question"},
]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


with open(os.path.join(WORK, "items.jsonl"), "w") as f:
    f.writelines(json.dumps(item) + "\n" for item in ITEMS)
for name, body in {
    "tiny_ll": """output_type: loglikelihood
metric_list:
  - metric: perplexity
  - metric: acc
""",
    "tiny_gen": """output_type: generate_until
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
""",
}.items():
    with open(os.path.join(WORK, f"{name}.yaml"), "w") as f:
        f.write(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {os.path.join(WORK, "items.jsonl")}
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
{body}""")

results = lm_eval.simple_evaluate(
    model="local-completions",
    model_args=f"model={MODEL},base_url={BASE}/v1/completions,tokenizer_backend=huggingface,tokenizer={MODEL_DIR},"
               "tokenized_requests=False,num_concurrent=1,max_retries=1",
    tasks=["tiny_ll", "tiny_gen"],
    task_manager=TaskManager(include_path=WORK),
    log_samples=True,
)
samples = results["samples"]
check(len(samples["tiny_ll"]) == len(ITEMS) and len(samples["tiny_gen"]) == len(ITEMS), "both tasks ran every item")

hf = GPTJForCausalLM.from_pretrained(MODEL_DIR, torch_dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
for sample in samples["tiny_ll"]:
    doc = sample["doc"]
    ours = sample["resps"][0][0][0]
    context, continuation = tokenizer(doc["context"])["input_ids"], tokenizer(doc["continuation"])["input_ids"]
    with torch.no_grad():
        log_probs = torch.log_softmax(hf(torch.tensor([context + continuation])).logits[0].float(), dim=-1)
    theirs = sum(log_probs[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))
    check(abs(ours - theirs) < TOLERANCE, f"loglikelihood of {doc['continuation']!r}: {ours} vs transformers' {theirs}")
for sample in samples["tiny_gen"]:
    check(isinstance(sample["resps"][0][0], str), f"a generation: {sample['resps'][0][0]!r}")
check("perplexity,none" in results["results"]["tiny_ll"], f"the task's metrics: {results['results']['tiny_ll']}")

print("all eval harness checks passed")
