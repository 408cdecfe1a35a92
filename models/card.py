"""The model card (README.md) of an exported folder: Hugging Face YAML front matter and a body a user can act on.

The front matter has base_model, library_name, pipeline_tag, tags, datasets and, when the model carries a final
evaluation (`info["eval"]`, written by training), a model-index with every dim x precision of it. The body says
what the model is for, how to use it (sentence-transformers, transformers, twinfold; prompts included), the
evaluation (Matryoshka dims x precisions, storage per million documents, base vs fine-tuned vs BM25), the
training recipe, data and checks, and the fingerprint.
"""
from pathlib import Path

import yaml

from twinfold.models.families import ENCODER_ONLY
from twinfold.models.quantize import format_megabytes
from twinfold.models.search import rescoring_note

CARD_FILE = "README.md"
METRICS = (("ndcg@10", "nDCG@10"), ("mrr@10", "MRR@10"), ("recall@10", "Recall@10"), ("recall@100", "Recall@100"),
           ("map@100", "MAP@100"))


def model_card(model) -> str:
    """The README.md text for `model` (a BiEncoder) and what its `info` records about training and evaluation."""
    training, evaluation = model.info.get("training", {}), model.info.get("eval", {})
    results = evaluation.get("results", [])
    front = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
             "tags": ["sentence-transformers", "sentence-similarity", "feature-extraction", "twinfold", "retrieval"]
             + (["matryoshka"] if model.settings.matryoshka_dims else [])}
    if training.get("base_model"):
        front = {"base_model": training["base_model"], **front}
    if training.get("data"):
        front["datasets"] = [d["name"] for d in training["data"]]
    final = [r for r in results if r.get("model") == "final"]
    if final:
        front["model-index"] = [{"name": _title(training), "results": _model_index(final, evaluation)}]
    body = [f"# {_title(training)}", _purpose(model, training), _usage(model), _evaluation(results, evaluation),
            "\n".join(general_lines(model.info.get("general"))), _merge(model.info.get("merge")),
            _training(training), _fingerprint(model)]
    header = yaml.safe_dump(front, sort_keys=False, allow_unicode=True)
    return f"---\n{header}---\n\n" + "\n\n".join(part for part in body if part) + "\n"


def write_model_card(model, folder: str | Path) -> None:
    (Path(folder) / CARD_FILE).write_text(model_card(model), encoding="utf-8")


def _title(training: dict) -> str:
    return f"{training['base_model']} fine-tuned with twinfold" if training.get("base_model") else "twinfold bi-encoder"


def _dataset(evaluation: dict) -> dict:
    name = Path(evaluation.get("data") or "eval").name
    split = evaluation.get("split", "test")
    return {"name": f"{name} ({split})", "type": name, "split": split}


def _model_index(rows: list[dict], evaluation: dict) -> list[dict]:
    """One model-index result per dim x precision of the final model, with the report's metrics unchanged."""
    out = []
    for r in rows:
        label = f"{r['dim']} dims, {r['precision']}"
        metrics = [{"type": key.replace("@", "_at_"), "value": r[key], "name": f"{name} ({label})",
                    "config": f"{r['dim']}d-{r['precision']}"} for key, name in METRICS if key in r]
        out.append({"task": {"type": "information-retrieval", "name": "Information Retrieval"},
                    "dataset": _dataset(evaluation), "metrics": metrics})
    return out


def _purpose(model, training: dict) -> str:
    dims = model.settings.matryoshka_dims
    what = (f"It maps queries and documents to {model.dim}-dimensional vectors"
            + (" (cosine similarity, unit length)" if model.settings.normalize else "")
            + (f"; the first {', '.join(map(str, dims[1:]))} dimensions are usable on their own (Matryoshka)"
               if len(dims) > 1 else "") + ".")
    data = training.get("data")
    names = ", ".join(f"{d['name']} ({d['pairs']} pairs)" if "pairs" in d else f"{d['name']} (streamed)"
                      for d in data or [])
    domain = (f" It was fine-tuned for retrieval on {names}: "
              "use it to search documents of that domain with short queries like its anchors, and check it on "
              "your own judged queries before relying on it elsewhere.") if data else ""
    return f"A bi-encoder for semantic search (one shared encoder, {model.settings.pooling} pooling). {what}{domain}"


def _usage(model) -> str:
    s = model.settings
    q, d = s.query_prefix, s.document_prefix
    small = s.matryoshka_dims[-1] if len(s.matryoshka_dims) > 1 else None
    prefixes = (f"Queries take the prefix {q!r}" if q else "Queries take no prefix") + \
        (f" and documents {d!r}." if d else "; documents take none.")
    pooling = {"mean": "(out * mask).sum(1) / mask.sum(1)", "cls": "out[:, 0]",
               "max": "out.masked_fill(mask == 0, -1e9).max(1).values"}.get(s.pooling)
    plain = pooling is not None and not len(model.head)  # other poolings and Dense heads: not a one-liner
    model_class = ENCODER_ONLY.get(model.encoder.config.model_type, "AutoModel")  # T5-likes: their encoder alone
    lines = [
        "## Usage", "", prefixes + f" Texts are truncated at {s.max_length} tokens"
        + ("; each ends with the EOS token, kept when a text is truncated." if s.append_eos else "."), "", *_prompts(s),
        "sentence-transformers:", "", "```python", "from sentence_transformers import SentenceTransformer", "",
        f'model = SentenceTransformer("path/to/this/model"{f", truncate_dim={small}" if small else ""})',
        'query = model.encode_query(["a question"])',
        'docs = model.encode_document(["a document", "another"])',
        "scores = model.similarity(query, docs)", "```", "",
        *(["transformers:", "", "```python", "import torch", f"from transformers import {model_class}, AutoTokenizer",
           "",
           'tokenizer = AutoTokenizer.from_pretrained("path/to/this/model")',
           f'model = {model_class}.from_pretrained("path/to/this/model")',
           f"batch = tokenizer([{q + 'a question'!r}], padding=True, truncation=True, max_length={s.max_length}, "
           "return_tensors=\"pt\")" + (f"  # documents: {d!r} + text" if d else ""),
           "with torch.no_grad():", "    out = model(**batch).last_hidden_state",
           "mask = batch[\"attention_mask\"].unsqueeze(-1).float()",
           f"emb = {pooling}",
           *(["emb = torch.nn.functional.normalize(emb, dim=-1)"] if s.normalize else []), "```", ""] if plain else
          [f"transformers alone does not apply this model's {s.pooling} pooling"
           + (" and Dense head" if len(model.head) else "") + "; use sentence-transformers or twinfold.", ""]),
        "twinfold:", "", "```python", "from twinfold.models import BiEncoder", "",
        'model = BiEncoder.from_pretrained("path/to/this/model")',
        'query = model.encode(["a question"], kind="query")            # adds the query prefix',
        'docs = model.encode(texts, kind="document"'
        + (f', dim={small}, precision="int8")' if small else ', precision="int8")'),
        "```", "",
        "Index a corpus and keep it in step with the model: `twinfold encode --model path/to/this/model "
        "--input corpus.jsonl --output corpus.safetensors`, then `--update corpus.safetensors` after the documents "
        "change.",
    ]
    return "\n".join(lines)


def _prompts(s) -> list[str]:
    """The named prompts, and how to encode with one."""
    if not s.prompts:
        return []
    default = f" The default prompt (sentence-transformers' `encode` without a name) is `{s.default_prompt_name}`." \
        if s.default_prompt_name else ""
    name = next(iter(s.prompts))
    cells = [(n.replace("|", "\\|"), repr(text).replace("|", "\\|")) for n, text in s.prompts.items()]
    return ["Named prompts:", "", "| name | prompt |", "|---|---|", *(f"| `{n}` | `{t}` |" for n, t in cells), "",
            f'Encode with one by name: `model.encode(texts, prompt_name="{name}")` (sentence-transformers and '
            f"twinfold), `twinfold encode --prompt-name {name}`.{default}", ""]


def _evaluation(results: list[dict], evaluation: dict) -> str:
    if not results:
        return "## Evaluation\n\nNo evaluation was recorded with this model."
    by = {(r["model"], r["dim"], r["precision"]): r for r in results}
    final = [r for r in results if r["model"] == "final"]
    has_base = any(r["model"] == "base" for r in results)
    d = _dataset(evaluation)
    lines = ["## Evaluation", "", f"nDCG@10 on {d['name']} (`{evaluation.get('data')}`); storage is the index size "
             "per million documents.", "",
             "| dim | precision | " + ("base | " if has_base else "")
             + "fine-tuned | MRR@10 | R@100 | storage / 1M docs |",
             "|---:|---|" + ("---:|" if has_base else "") + "---:|---:|---:|---:|"]
    for r in final:
        base = by.get(("base", r["dim"], r["precision"]))
        cells = [str(r["dim"]), r["precision"]] + ([f"{base['ndcg@10']:.4f}" if base else "–"] if has_base else [])
        cells += [f"{r['ndcg@10']:.4f}", f"{r.get('mrr@10', float('nan')):.4f}",
                  f"{r.get('recall@100', float('nan')):.4f}", format_megabytes(r["storage_mb_per_million_docs"])]
        lines.append("| " + " | ".join(cells) + " |")
    if "rescore_multiplier" in evaluation and any(r["precision"] == "binary" for r in final):
        lines += ["", rescoring_note(evaluation["rescore_multiplier"], max(evaluation["k_values"]))]
    for r in results:
        if r["model"] == "bm25":
            lines += ["", f"BM25 on the same queries: nDCG@10 {r['ndcg@10']:.4f} ({r.get('bm25', 'bm25s defaults')})."]
    return "\n".join(lines)


def _merge(merge: dict | None) -> str:
    """What `twinfold merge` made this model of (models.merge), and the scores that chose an automatic alpha."""
    if not merge:
        return ""
    base, tuned = merge["base"], merge["tuned"]
    lines = ["## Merge", "", f"The weights are `{merge['formula']}` with alpha {merge['alpha']:g}: base "
             f"`{base['model']}` (fingerprint {base['fingerprint']}), tuned `{tuned['model']}` "
             f"(fingerprint {tuned['fingerprint']})."]
    if "auto" in merge:
        a = merge["auto"]
        lines += ["", f"alpha was chosen as the one with the largest mean general score "
                  f"({', '.join(g['data'] for g in a['general'])}) among those keeping {a['keep_gain']:.0%} of the "
                  f"nDCG@10 gain on {a['dev']} ({a['dev_split']}):", "", "| alpha | dev nDCG@10 | general |",
                  "|---:|---:|---:|"]
        lines += [f"| {r['alpha']:g} | {r['dev']:.4f} | " + (f"{r['general']:.4f}" if "general" in r else "–") + " |"
                  for r in a["scores"]]
    return "\n".join(lines)


def general_lines(general: dict | None) -> list[str]:
    """The table of general scores (forgetting: base against fine-tuned), for the card and the evaluation report."""
    if not general:
        return []
    lines = ["## General sets (forgetting)", "", "Scores at full dimension, float32; a change below "
             f"-{general['tolerance']:g} is flagged.", "", "| set | metric | base | fine-tuned | change |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| `{r['data']}` | {r['metric']} | {r['base']:.4f} | {r['final']:.4f} | {r['change']:+.4f}"
              + (" (fell)" if r["fell_beyond_tolerance"] else "") + " |" for r in general["results"]]
    return lines


def _loss_kind(loss: dict) -> str:
    """The loss and its temperatures, in words."""
    kind, temperature = loss.get("kind", "infonce"), loss.get("temperature")
    if kind == "infonce":
        return f"InfoNCE at temperature {temperature}"
    teacher = loss.get("teacher_temperature") or temperature
    name = {"margin_mse": "MarginMSE", "kl": "listwise KL"}.get(kind, kind)
    return f"{name} distilled from teacher scores, student temperature {temperature}, teacher temperature {teacher}"


def _training(training: dict) -> str:
    if not training:
        return ""
    loss = training.get("loss", {})
    dims = loss.get("matryoshka_dims")
    lines = ["## Training", "",
             f"- base model: `{training.get('base_model')}`; {training.get('steps')} steps, global batch "
             f"{training.get('batch_size')} (in-batch negatives), AdamW lr {training.get('lr')}, warm-up ratio "
             f"{training.get('warmup_ratio')}, seed {training.get('seed')}",
             f"- loss: {_loss_kind(loss)}" + (f" inside Matryoshka {dims}" if dims else "")
             + (", symmetric" if loss.get("symmetric") else "")
             + _quantization(loss.get("quantization"), dims)]
    if rotation := training.get("code_rotation"):
        lines.append(f"- code rotation (the last Dense layer): an orthogonal rotation of each block between dims "
                     f"{[0, *rotation['blocks']]}, fitted block by block ({rotation['steps']} steps each) so that the "
                     f"sign bits of {rotation['documents']} training documents rank them for {rotation['pairs']} "
                     f"training queries "
                     f"(loss {rotation['loss_before']:.4f} -> {rotation['loss_after']:.4f}); float search is unchanged")
    for data in training.get("data", []):
        negatives = data.get("negatives_per_pair", 0)
        lines.append(f"- data: {data['name']}, " + (f"{data['pairs']} pairs" if "pairs" in data else "streamed")
                     + (f", {negatives} hard negative(s) per pair" if negatives else "")
                     + (f", query prompt `{data['query_prompt_name']}`" if "query_prompt_name" in data else "")
                     + (f", query prompt {data['query_prompt']!r}" if "query_prompt" in data else ""))
    for mined in training.get("hard_negatives", []):
        s = mined["settings"]
        lines.append(f"- hard negatives mined with `{mined['model']}` (fingerprint {mined['fingerprint']}) from "
                     f"{mined['corpus']}: {s['candidates']} candidates ranked {s['range_min']}-{s['range_max']}, "
                     + (f"guard {s['max_score_ratio']} x the positive's score, " if s["max_score_ratio"]
                        else "no guard, ")
                     + (f"teacher `{s['teacher']}` guard (margin {s['teacher_margin']}, "
                        f"{mined.get('teacher_dropped')} dropped), " if s.get("teacher") else "")
                     + f"{s['sampling']} sampling; "
                     f"{mined['rows_out']} of {mined['rows_in']} rows kept")
    for check in training.get("leakage", []):
        o, dup = check["eval_overlap"], check["duplicates"]
        lines.append(f"- checks on {check['dataset']}: {o['exact']} exact and {o['near']} near overlaps with the "
                     f"eval set, {dup['exact']} exact and {dup['near']} near duplicate pairs, "
                     f"{check['dropped']} dropped")
    return "\n".join(lines)


def _quantization(q: dict | None, dims: list[int] | None) -> str:
    """The loss line's account of the quantization-aware terms: which stored forms, weights and dims."""
    if not q:
        return ""
    forms = " and ".join(f"{name} (weight {q[key]})" for key, name in (("binary", "sign bits"), ("int8", "int8 codes"))
                         if q.get(key))
    at = q.get("dims") or dims
    return ((f"; trained for search over the documents' {forms}" if forms else "; trained for sign-bit search")
            + (f", every embedding aligned with its sign bits (weight {q['alignment']})" if q.get("alignment") else "")
            + (f" at dims {at}" if at else "") + f", {q.get('estimator', 'ste')} estimator")


def _fingerprint(model) -> str:
    return (f"## Fingerprint\n\n`{model.fingerprint()}`: a hash of the weights and embedding settings. Embedding "
            "files written by `twinfold encode` carry it; `twinfold encode --check FILE --model "
            "path/to/this/model` says whether a file belongs to this model.")
