"""Does stage 2 of the miniature use the image? (issue 5, Figure 5 in miniature)

Reads a finished demo home (read only) and prints two diagnostics as JSON:

1. `llm_loss_at_offset`: the frozen OPT teacher's own caption loss (no visual prompt) when the caption
   starts at position 0, 4, 8, 16. The bridge puts the Q queries first and OPT numbers positions from the
   attention mask, so every caption is read Q positions on; a teacher that never saw text there pays for it.
2. `stage2_runs`: for every finished stage-2 run (with and without stage 1), the loss on stage-2 batches
   with the true images and with the images rolled by one within the batch. Equal numbers mean the run
   ignores the image, whatever its training loss. The batches are a fresh draw from the runs' own source
   (the demo has no held-out pretraining split), which if anything flatters a run's use of the image.

   `prompt_knows_background`: held-out accuracy of a linear probe that reads the scene's background colour
   from the run's projected visual prompt (what reaches the LLM's input), chance beside it.
3. With `--teacher DIR` (an OPT teacher folder; repeatable), instead: how far a soft prompt can steer it
   (`prompt_steerability`: caption loss of 64 test captions with no prompt, with one optimised prompt for
   all, and with an optimised prompt per caption, the upper bound on what stage 2's queries can do), and
   its text-only VQA on the val split with and without the image's true caption in front
   (`text_context_vqa`: does it read an answer from its context at all?), and `background_prompt`: the
   held-out caption loss after one optimised prompt for all captions and after one per background colour
   (an oracle that knows only the background: what that fact is worth to this LLM, in nats per token).

4. With `--vision`, instead: what the frozen image encoder's tokens tell a linear read-out about each
   image's ground-truth caption (`vision_words`): per content word (colours, shapes, counts, sizes,
   positions), the held-out balanced accuracy of a ridge probe (word present or not) on the mean of the
   tokens and on all tokens; 0.5 is chance. A stage-2 bridge can only pass on what these tokens hold.

    .venv/bin/python benchmarks/figure5_probe.py var            # a demo home
    .venv/bin/python benchmarks/figure5_probe.py var --batches 4
    .venv/bin/python benchmarks/figure5_probe.py var --teacher var/teachers/<hash>/opt
    .venv/bin/python benchmarks/figure5_probe.py var --vision    # the preset's image encoder
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import torch

OFFSETS = (0, 4, 8, 16)


def stage2_batches(job_path: Path, count: int) -> list[dict]:
    from blip2_core import train as T
    from flows.torchrun_entry import TrainJob, build_data

    job = TrainJob.read(job_path)
    job = TrainJob(**{**job.__dict__, "num_workers": 0, "seed": 12345})  # not the run's own sample order
    batches = iter(build_data(job, job.blip2_config(), T.DistEnv.from_env()))
    return [next(batches) for _ in range(count)]


@torch.no_grad()
def llm_loss_at_offsets(llm_dir: str, batches: list[dict]) -> dict[int, float]:
    from blip2_core.llm_bridge import decoder_text_inputs, lm_loss, load_llm

    llm, tokenizer = load_llm(llm_dir)
    losses = {}
    for offset in OFFSETS:
        total = 0.0
        for batch in batches:
            text = decoder_text_inputs(tokenizer, batch["captions"], None, "\n", 32)
            positions = (text.attention_mask.cumsum(1) - 1).clamp(min=0) + offset
            logits = llm(input_ids=text.input_ids, attention_mask=text.attention_mask, position_ids=positions)
            total += lm_loss(logits.logits, text.labels).item()
        losses[offset] = round(total / len(batches), 4)
    return losses


def load_run_model(run_dir: Path) -> tuple[torch.nn.Module, object, Path]:
    """A finished stage-2 run's model at its last checkpoint (eval mode), its job and that checkpoint."""
    from safetensors.torch import load_file

    from blip2_core.checkpoints import WEIGHTS_FILE
    from flows.torchrun_entry import TrainJob, build_model

    job = TrainJob.read(run_dir / "job.json")
    model = build_model(job, job.blip2_config()).eval()
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    missing = model.load_state_dict(load_file(last / WEIGHTS_FILE), strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    return model, job, last


@torch.no_grad()
def true_and_shuffled_loss(model: torch.nn.Module, batches: list[dict]) -> dict[str, float]:
    true = shuffled = 0.0
    for batch in batches:
        rolled = torch.roll(torch.arange(len(batch["captions"])), 1)
        true += model(batch).loss.item()
        shuffled += model({"images": batch["images"][rolled], "captions": batch["captions"]}).loss.item()
    return {
        "true_images": round(true / len(batches), 4),
        "shuffled_images": round(shuffled / len(batches), 4),
    }


def _soft_prompt_inputs(llm, tokenizer, captions: list[str], slots: int):
    """Caption embeddings, the attention mask and labels with `slots` prompt positions in front, and the
    scale of the LLM's token embeddings (for initialising prompts)."""
    from blip2_core.llm_bridge import IGNORE_INDEX, decoder_text_inputs

    text = decoder_text_inputs(tokenizer, captions, None, "\n", 32)
    embeds = llm.get_input_embeddings()(text.input_ids)  # (B, T, D)
    b = embeds.shape[0]
    mask = torch.cat([torch.ones(b, slots, dtype=torch.long), text.attention_mask], 1)
    labels = torch.cat([torch.full((b, slots), IGNORE_INDEX), text.labels], 1)
    return text, embeds, mask, labels, llm.get_input_embeddings().weight.std().item()


def prompt_steerability(llm_dir: str, captions: list[str], slots: int = 8, steps: int = 150) -> dict:
    """Caption loss of the frozen LLM after `slots` soft-prompt vectors (Adam, lr 0.05) are optimised
    for all captions at once ("shared") and for each caption on its own ("per_caption")."""
    from blip2_core.llm_bridge import lm_loss, load_llm

    llm, tokenizer = load_llm(llm_dir)
    text, embeds, mask, labels, scale = _soft_prompt_inputs(llm, tokenizer, captions, slots)
    b, _, d = embeds.shape

    def loss(prompt: torch.Tensor) -> torch.Tensor:
        logits = llm(inputs_embeds=torch.cat([prompt.expand(b, slots, d), embeds], 1), attention_mask=mask)
        return lm_loss(logits.logits, labels)

    out = {}
    with torch.no_grad():
        out["no_prompt"] = lm_loss(llm(input_ids=text.input_ids, attention_mask=text.attention_mask).logits,
                                   text.labels).item()  # fmt: skip
    for name, rows in (("shared", 1), ("per_caption", b)):
        torch.manual_seed(0)
        prompt = torch.nn.Parameter(torch.randn(rows, slots, d) * scale)
        optimizer = torch.optim.Adam([prompt], lr=0.05)
        for _ in range(steps):
            value = loss(prompt)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        with torch.no_grad():
            out[name] = loss(prompt).item()
    return {k: round(v, 4) for k, v in out.items()}


@torch.no_grad()
def text_context_vqa(llm_dir: str, corpus: Path) -> dict:
    """Exact-match accuracy (%) per answer type of greedy answers to "Question: q Answer:" on the VQA val
    split, alone and after the image's ground-truth caption ("caption\\n" in front)."""
    import pyarrow.parquet as pq

    from blip2_core.llm_bridge import load_llm

    llm, tokenizer = load_llm(llm_dir)
    files = json.loads((corpus / "corpus.json").read_text())["files"]
    rows = pq.read_table(corpus / files["manifest_vqa_val"]).select(["image_id", "gt_caption"]).to_pylist()
    captions = {r["image_id"]: r["gt_caption"] for r in rows}
    questions = json.loads((corpus / files["vqa_questions_val"]).read_text())["questions"]
    annotations = json.loads((corpus / files["vqa_annotations_val"]).read_text())["annotations"]
    truth = {a["question_id"]: (a["multiple_choice_answer"], a["answer_type"]) for a in annotations}
    newline = tokenizer("\n", add_special_tokens=False).input_ids[0]
    out = {}
    for context in (False, True):
        hits: dict[str, list[bool]] = {}
        for q in questions:
            prompt = (
                captions[q["image_id"]] + "\n" if context else ""
            ) + f"Question: {q['question']} Answer:"
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            new = llm.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=newline,
                               pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]  # fmt: skip
            answer, kind = truth[q["question_id"]]
            hits.setdefault(kind, []).append(
                tokenizer.decode(new, skip_special_tokens=True).strip() == answer
            )
        every = [h for v in hits.values() for h in v]
        out["caption in front" if context else "question alone"] = {
            **{k: round(100 * sum(v) / len(v), 1) for k, v in hits.items()},
            "all": round(100 * sum(every) / len(every), 1),
        }
    return out


def pretrain_rows(home: Path, count: int | None = None) -> list[dict]:
    """The first `count` rows (all when None) of the corpus' pretraining manifest."""
    import pyarrow.parquet as pq

    return pq.read_table(home / "corpus" / "manifests" / "pretrain.parquet").to_pylist()[:count]


def pretrain_images(home: Path, rows: list[dict], image_size: int) -> torch.Tensor:
    """(N, 3, S, S) the rows' images through the evaluation transform."""
    from PIL import Image

    from blip2_core.data import AugmentConfig, ImageTransform

    transform = ImageTransform(AugmentConfig(image_size=image_size, train=False))
    rng = random.Random(0)
    return torch.stack(
        [transform(Image.open(home / "corpus" / r["path"]).convert("RGB"), rng)[0] for r in rows]
    )


def _background(caption: str) -> str:
    """The background colour of a corpus ground-truth caption ("... on a red background")."""
    match = re.search(r"on an? (\w+) background$", caption)
    if match is None:
        raise ValueError(f"not a ground-truth caption of the synthetic corpus: {caption!r}")
    return match.group(1)


def background_prompt(llm_dir: str, home: Path, slots: int = 8, steps: int = 200) -> dict:
    """Held-out caption loss (256 of 768 ground-truth captions) after training (Adam, lr 0.05, batch 64) one
    soft prompt for all captions, and one per background colour."""
    from blip2_core.llm_bridge import lm_loss, load_llm

    captions = [r["gt_caption"] for r in pretrain_rows(home, 768)]
    llm, tokenizer = load_llm(llm_dir)
    llm.requires_grad_(False)
    _, embeds, mask, labels, scale = _soft_prompt_inputs(llm, tokenizer, captions, slots)
    b, _, d = embeds.shape
    train, held_out = torch.arange(0, 512), torch.arange(512, b)

    def loss(prompts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        logits = llm(inputs_embeds=torch.cat([prompts[rows], embeds[rows]], 1), attention_mask=mask[rows])
        return lm_loss(logits.logits, labels[rows])

    out = {}
    for name, keys in (
        ("one_prompt", ["all"] * b),
        ("prompt_per_background", list(map(_background, captions))),
    ):
        names = sorted(set(keys))
        which = torch.tensor([names.index(k) for k in keys])
        torch.manual_seed(0)
        prompts = torch.nn.Parameter(torch.randn(len(names), slots, d) * scale)
        optimizer = torch.optim.Adam([prompts], lr=0.05)
        for _ in range(steps):
            value = loss(prompts[which], train[torch.randint(0, len(train), (64,))])
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        with torch.no_grad():
            out[name] = round(loss(prompts[which], held_out).item(), 4)
    out["background_worth_nats_per_token"] = round(out["one_prompt"] - out["prompt_per_background"], 4)
    return out


@torch.no_grad()
def prompt_knows_background(model: torch.nn.Module, home: Path) -> dict:
    """Held-out accuracy of a linear probe (trained on 450 of 600 images) reading the background colour
    from the model's projected visual prompt."""
    rows = pretrain_rows(home, 600)
    images = pretrain_images(home, rows, model.cfg.vision.image_size)
    x = model.bridge.llm_projection(model.query_output(images)).flatten(1)  # (N, Q * D_llm)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    names = sorted({_background(r["gt_caption"]) for r in rows})
    y = torch.tensor([names.index(_background(r["gt_caption"])) for r in rows])
    with torch.enable_grad():
        probe = torch.nn.Linear(x.shape[1], len(names))
        optimizer = torch.optim.Adam(probe.parameters(), lr=0.05)
        for _ in range(300):
            value = (
                torch.nn.functional.cross_entropy(probe(x[:450]), y[:450]) + 1e-3 * probe.weight.pow(2).sum()
            )
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
    accuracy = (probe(x[450:]).argmax(1) == y[450:]).float().mean().item()
    return {"accuracy": round(accuracy, 3), "chance": round(1 / len(names), 3)}


WORD_GROUPS = {
    "colour": ("red", "green", "blue", "yellow", "orange", "purple", "white", "black"),
    "shape": ("circle", "square", "triangle", "rectangle", "star"),
    "count": ("two", "three"),
    "size": ("small", "large"),
    "position": ("left", "right", "top", "bottom", "center"),
}


def _balanced_accuracy(score: torch.Tensor, truth: torch.Tensor) -> float:
    """Of a score thresholded half-way between the two classes' mean scores."""
    pos, neg = truth, ~truth
    threshold = 0.5 * (score[pos].mean() + score[neg].mean())
    return 0.5 * ((score[pos] > threshold).float().mean() + (score[neg] <= threshold).float().mean()).item()


@torch.no_grad()
def vision_words(home: Path, count: int = 1200, held_out: int = 400) -> dict:
    """Balanced accuracy of ridge probes reading each content word of the ground-truth caption from the
    frozen image encoder's raw tokens (the preset's `vision` section; before ln_vision).
    A word counts once whatever its form ("circles" is "circle")."""
    from blip2_core.stage2 import build_visual_encoder
    from flows.torchrun_entry import TrainJob

    runs = [p for stage in ("stage2", "stage1") for p in sorted((home / "runs" / stage).glob("*/job.json"))]
    if not runs:
        raise SystemExit(f"no stage-1 or stage-2 run under {home}/runs to read the preset from")
    cfg = TrainJob.read(runs[0]).blip2_config()
    encoder = build_visual_encoder(cfg).eval()
    rows = pretrain_rows(home, count)
    images = pretrain_images(home, rows, cfg.vision.image_size)
    # (N, S, W) tokens of each image, 100 images at a time
    tokens = torch.cat([encoder(images[i : i + 100]) for i in range(0, len(rows), 100)])
    words = [set(re.sub(r"s\b", "", r["gt_caption"]).split()) for r in rows]  # plural -> singular
    out = {}
    train, test = slice(0, len(rows) - held_out), slice(len(rows) - held_out, len(rows))
    for name, x, ridge in (("mean_token", tokens.mean(1), 10.0), ("all_tokens", tokens.flatten(1), 1000.0)):
        x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
        gram = x[train].T @ x[train] + ridge * torch.eye(x.shape[1])
        groups = {}
        for group, vocabulary in WORD_GROUPS.items():
            scores = {}
            for word in vocabulary:
                y = torch.tensor([word in w for w in words])
                if y[train].sum() < 10 or y[test].sum() < 5:
                    continue
                weight = torch.linalg.solve(gram, x[train].T @ (y[train].float() - y[train].float().mean()))
                scores[word] = round(_balanced_accuracy(x[test] @ weight, y[test]), 3)
            groups[group] = {"mean": round(sum(scores.values()) / max(len(scores), 1), 3), "words": scores}
        out[name] = groups
    return {"encoder": cfg.vision.pretrained, "images": len(rows), "held_out": held_out, **out}


def run_report(run_dir: Path, batches: list[dict], home: Path) -> dict:
    model, job, last = load_run_model(run_dir)
    return {
        "step": int(last.name.split("-")[1]),
        "stage1_checkpoint": job.stage1_checkpoint,
        **true_and_shuffled_loss(model, batches),
        "prompt_knows_background": prompt_knows_background(model, home),
    }


def teacher_report(home: Path, teachers: list[str]) -> dict:
    coco = json.loads((home / "corpus" / "coco" / "annotations" / "captions_test.json").read_text())
    captions = [a["caption"] for a in coco["annotations"]][::7][:64]
    return {
        t: {"prompt_steerability": prompt_steerability(t, captions),
            "text_context_vqa": text_context_vqa(t, home / "corpus"),
            "background_prompt": background_prompt(t, home)}
        for t in teachers
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("home", type=Path, help="a demo home (var/) with finished stage-2 runs")
    parser.add_argument("--batches", type=int, default=6, help="batches of the stage-2 batch size")
    parser.add_argument("--teacher", action="append", help="probe this OPT teacher folder instead (3.)")
    parser.add_argument("--vision", action="store_true", help="probe the frozen image encoder instead (4.)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.vision:
        print(json.dumps(vision_words(args.home), indent=1))
        return
    if args.teacher:
        print(json.dumps(teacher_report(args.home, args.teacher), indent=1))
        return
    runs = sorted(p.parent for p in (args.home / "runs" / "stage2").glob("*/job.json"))
    runs = [r for r in runs if any((r / "checkpoints").glob("step-*"))]
    if not runs:
        raise SystemExit(f"no finished stage-2 run under {args.home}/runs/stage2")
    batches = stage2_batches(runs[0] / "job.json", args.batches)
    from flows.torchrun_entry import TrainJob

    llm_dir = TrainJob.read(runs[0] / "job.json").blip2_config().llm.name
    report = {
        "llm": llm_dir,
        "llm_loss_at_offset": llm_loss_at_offsets(llm_dir, batches),
        "stage2_runs": {r.name: run_report(r, batches, args.home) for r in runs},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
