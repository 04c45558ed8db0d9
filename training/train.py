"""Train tiny-dualfocus in three stages (seeded); write a checkpoint vLLM loads as any LLaVA.

    python -m training.train --out training/tiny-dualfocus --log training/tiny-dualfocus/train-log.jsonl

Stages (the language-model loss alone, from scratch, stays at chance on this task):
  1. vision: the CLIP tower with small direct heads on its patch features (sign colour at each
     patch, dot colour in each patch, the covering sign's box), on full images and crops;
  2. projector + language model on the DualFocus prompts, the tower at a fifth of the learning
     rate and still taught by its heads (on a small side batch): macro answers on the
     full image, the box for the question, micro answers on [full image, crop], and the
     scoring-turn answers fusion compares;
  3. the same at half the learning rate (the tower at a tenth).
Progress (losses, teacher-forced accuracies, elapsed time) goes to --log as JSON lines; the
training state is saved every --checkpoint-every steps and at each stage's end to OUT/../.train-state.pt
(for --resume and --export-only).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import Batches
from .model import build_config, build_tokenizer, save_checkpoint
from .task import COLOUR_NAMES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (created if missing)")
    p.add_argument("--log", type=Path, required=True, help="JSON-lines progress log")
    p.add_argument("--seed", type=int, default=0, help="seeds weights and the training scenes (default: %(default)s)")
    p.add_argument("--vision-steps", type=int, default=600, help="stage 1 steps (default: %(default)s)")
    p.add_argument("--projector-steps", type=int, default=1000, help="stage 2 steps (default: %(default)s)")
    p.add_argument("--full-steps", type=int, default=800, help="stage 3 steps (default: %(default)s)")
    p.add_argument("--minutes", type=float, nargs=3, metavar=("VISION", "PROJECTOR", "FULL"),
                   help="also end each stage after this many minutes (the learning-rate schedule follows whichever "
                        "of steps and time runs out first), so a run on a shared machine ends on time; "
                        "training.json records the steps each stage took, to repeat the run with --*-steps")
    p.add_argument("--vision-batch", type=int, default=32, help="images per stage-1 step (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="sequences per stage-2/3 step (default: %(default)s)")
    p.add_argument("--side-vision-batch", type=int, default=16,
                   help="images per stage-2/3 step for the tower's direct heads (default: %(default)s)")
    p.add_argument("--image-word-weight", type=float, default=1.0,
                   help="weight of the image-word loss in stages 2-3 (0: off; see lm_step) (default: %(default)s)")
    p.add_argument("--attention-weight", type=float, default=1.0,
                   help="weight of the attention loss in stages 2-3 (0: off; see lm_step) (default: %(default)s)")
    p.add_argument("--number-sigma", type=float, default=2.0,
                   help="width, in hundredths, of the soft targets of a box's numbers (0: one-hot; see "
                        "soft_number_targets) (default: %(default)s)")
    p.add_argument("--number-weight", type=float, default=1.0,
                   help="weight of the box numbers' loss in stages 2-3 (default: %(default)s)")
    p.add_argument("--order-number-rows", action="store_true",
                   help="before this invocation's first language-model step, lay the box numbers' rows of the "
                        "output head along a curve in value order (see order_number_rows)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; on a shared 2-core machine 1 is faster than 2 (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between saves (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/../.train-state.pt")
    p.add_argument("--state", type=Path, help="training state file (default: OUT/../.train-state.pt)")
    p.add_argument("--export-only", action="store_true",
                   help="write OUT from the saved training state (e.g. of a run still going) and stop")
    return p.parse_args(argv)


class VisionHeads(torch.nn.Module):
    """Direct supervision (discarded afterwards): on the vision tower's patch features (stage 1, and the side
    batches of stages 2-3), and `token_box` on the projected image tokens (lm_step's box probe)."""

    def __init__(self, width: int, text_width: int):
        super().__init__()
        n = len(COLOUR_NAMES) + 1
        self.colour, self.dot, self.box = torch.nn.Linear(width, n), torch.nn.Linear(width, n), torch.nn.Linear(width, 4)
        self.token_box = torch.nn.Linear(text_width, 4)
        self.number = torch.nn.Linear(text_width, 1)

    def vision_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.colour.parameters(), *self.dot.parameters(), *self.box.parameters()]

    def language_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.token_box.parameters(), *self.number.parameters()]


def lr_at(step: int, progress: float, peak: float, warmup: int = 30) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from the peak to a tenth of it as progress goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def patch_features(model, pixels: torch.Tensor) -> torch.Tensor:
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_tokenizer()
    numbers = number_token_ids(tokenizer)
    ones = torch.tensor(tokenizer.convert_tokens_to_ids(["1", "\u01201"]))  # "1" and " 1" (byte-level BPE)
    config = build_config(tokenizer)
    model = LlavaForConditionalGeneration(config).float()
    model.set_attn_implementation("eager")  # the attention loss reads the attention weights
    heads = VisionHeads(config.vision_config.hidden_size, config.text_config.hidden_size)
    state_path = args.state or args.out.parent / ".train-state.pt"
    stages = [("vision", args.vision_steps), ("projector", args.projector_steps), ("full", args.full_steps)]
    done = {"vision": 0, "projector": 0, "full": 0}
    stage_seconds: dict[str, float] = {}
    steps_taken: dict[str, int] = {}
    elapsed0 = 0.0
    if (args.resume or args.export_only) and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"], strict=False)  # a state from before token_box starts it afresh
        done, elapsed0 = state["done"], state["elapsed"]
        stage_seconds, steps_taken = state["stage_seconds"], state["steps_taken"]
        for i, (stage, steps) in enumerate(stages):  # a larger budget than the run had continues a stage
            budget = args.minutes[i] * 60 if args.minutes else math.inf
            if stage in steps_taken and steps_taken[stage] < steps and stage_seconds[stage] < budget:
                done[stage] = steps_taken.pop(stage)
    if args.export_only:
        save_checkpoint(model, tokenizer, args.out, meta={"steps": done, "train_seconds": round(elapsed0)})
        print(f"exported {args.out} from {state_path} (steps {done})")
        return 0
    args.log.parent.mkdir(parents=True, exist_ok=True)
    log = args.log.open("a")
    t0 = time.monotonic() - elapsed0
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M", flush=True)

    def save_state():
        torch.save({"model": model.state_dict(), "heads": heads.state_dict(), "done": done,
                    "elapsed": time.monotonic() - t0,
                    "stage_seconds": stage_seconds, "steps_taken": steps_taken}, state_path)

    def record(entry: dict):
        entry["elapsed_s"] = round(time.monotonic() - t0, 1)
        log.write(json.dumps(entry) + "\n")
        log.flush()
        print(json.dumps(entry), flush=True)

    vision = model.model.vision_tower
    for stage, steps in stages:
        if done[stage] >= steps:
            continue
        if stage == "vision":
            params = [{"params": list(vision.parameters()) + heads.vision_parameters(), "lr": args.lr}]
        elif stage == "projector":
            params = [{"params": [p for n, p in model.named_parameters() if "vision_tower" not in n]
                       + heads.language_parameters(), "lr": args.lr},
                      {"params": list(vision.parameters()) + heads.vision_parameters(), "lr": args.lr / 5}]
        else:
            params = [{"params": [p for n, p in model.named_parameters() if "vision_tower" not in n]
                       + heads.language_parameters(), "lr": args.lr / 2},
                      {"params": list(vision.parameters()) + heads.vision_parameters(), "lr": args.lr / 10}]
        opt = torch.optim.AdamW(params, weight_decay=0.01)
        # Scenes are rendered in two worker processes while this one trains; each stage and resume gets its own seed.
        stream = Batches(tokenizer, args.seed * 100 + 10 * len(stages) * done[stage] + stages.index((stage, steps)),
                         args.vision_batch if stage == "vision" else args.batch, vision=stage == "vision")
        batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, prefetch_factor=2,
                                                   collate_fn=lambda b: b))
        # Stages 2-3 keep the tower's direct heads learning beside the language model, on a small batch
        # of full images and crops: the dot on the crop is the one thing the language-model loss alone
        # is too weak to teach the tower.
        side = None if stage == "vision" else iter(torch.utils.data.DataLoader(
            Batches(tokenizer, args.seed * 100 + 50 + stages.index((stage, steps)), args.side_vision_batch, vision=True),
            batch_size=None, num_workers=1, prefetch_factor=2, collate_fn=lambda b: b))
        peaks = [g["lr"] for g in opt.param_groups]
        window: dict[str, list[float]] = {}
        budget = args.minutes[[name for name, _ in stages].index(stage)] * 60 if args.minutes else math.inf
        started, spent0 = time.monotonic(), stage_seconds.get(stage, 0.0)
        if stage != "vision" and args.order_number_rows:
            order_number_rows(model, numbers, args.seed)
            args.order_number_rows = False
        for step in range(done[stage], steps):
            spent = spent0 + time.monotonic() - started
            stage_seconds[stage] = spent
            if spent > budget:
                break
            progress = max(step / steps, spent / budget)
            for g, peak in zip(opt.param_groups, peaks):
                g["lr"] = lr_at(step, progress, peak)
            batch = next(batches)
            metrics = vision_step(model, heads, batch) if stage == "vision" else lm_step(model, heads, batch, numbers, ones, args.image_word_weight,
                                                                                   args.attention_weight, args.number_sigma, args.number_weight)
            if side is not None:
                extra = vision_step(model, heads, next(side))
                metrics["loss_tensor"] = metrics["loss_tensor"] + extra.pop("loss_tensor")
                metrics.update({f"vision_{k}": v for k, v in extra.items()})
            opt.zero_grad()
            metrics.pop("loss_tensor").backward()
            torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
            opt.step()
            for k, v in metrics.items():
                window.setdefault(k, []).append(v)
            done[stage] = step + 1
            if (step + 1) % 20 == 0 or step + 1 == steps:
                record({"stage": stage, "step": step + 1, "lr": round(opt.param_groups[0]["lr"], 6),
                        **{k: round(sum(v) / len(v), 4) for k, v in window.items() if v}})
                window = {}
            if (step + 1) % args.checkpoint_every == 0 or step + 1 == steps:
                save_state()
                save_checkpoint(model, tokenizer, args.out)
        steps_taken[stage] = done[stage]
        done[stage] = steps  # a stage that ran out of time is over too
        record({"stage": stage, "ended_after_steps": steps_taken[stage], "stage_seconds": round(stage_seconds[stage])})
        save_state()
    save_checkpoint(model, tokenizer, args.out, meta={
        "seed": args.seed, "steps": steps_taken, "stage_seconds": {k: round(v) for k, v in stage_seconds.items()}, "batch": args.batch, "vision_batch": args.vision_batch,
        "train_seconds": round(time.monotonic() - t0), "threads": args.threads})
    print(f"done in {time.monotonic() - t0:.0f} s; checkpoint: {args.out}", flush=True)
    return 0


def vision_step(model, heads: VisionHeads, batch: dict) -> dict:
    colour, dot, boxes = batch["colour"].view(-1), batch["dot"].view(-1), batch["boxes"].view(-1, 4)
    feats = patch_features(model, batch["pixel_values"]).reshape(-1, model.config.vision_config.hidden_size)
    assert feats.shape[0] == colour.shape[0]
    c_logits, d_logits = heads.colour(feats), heads.dot(feats)
    loss_c = F.cross_entropy(c_logits, colour)
    # Patches with a dot are rare: weigh them up so the head does not learn "no dot".
    weights = torch.ones(len(COLOUR_NAMES) + 1)
    weights[1:] = 10.0
    loss_d = F.cross_entropy(d_logits, dot, weight=weights)
    has_box = boxes[:, 0] >= 0
    loss_b = F.l1_loss(heads.box(feats[has_box]), boxes[has_box]) * 10 if has_box.any() else feats.sum() * 0
    with_dot = dot > 0
    loss = loss_c + loss_d + loss_b
    return {"loss_tensor": loss, "loss": loss.item(),
            "colour_acc": float((c_logits.argmax(-1) == colour).float().mean()),
            "dot_acc": float((d_logits[with_dot].argmax(-1) == dot[with_dot]).float().mean()) if with_dot.any() else 0.0,
            "box_l1": loss_b.item() / 10}


def number_token_ids(tokenizer) -> torch.Tensor:
    """The ids of the two-digit tokens a box's numbers are written with ("46" of "0.46"), in value order:
    entry v is the token of v (00-99)."""
    by_value = {int(t): i for t, i in tokenizer.get_vocab().items() if len(t) == 2 and t.isdigit()}
    assert sorted(by_value) == list(range(100)), "the tokenizer must have every two-digit number as a token"
    return torch.tensor([by_value[v] for v in range(100)])


def order_number_rows(model, number_ids: torch.Tensor, seed: int) -> None:
    """Set the output head's rows of the numbers 00-99 to points on a parabola in value order: row(v) =
    mean + s * (t u - t^2 c), t = (v - 49.5) / 50, u and c two random orthogonal directions. A hidden state
    then says a number by holding it as a position along u (and a sharpness along c). Without this the rows
    start alike, a hidden state holding the edge's position moves no number's logit more than another's,
    and the box loss sat at a uniform guess while the copied image token held the edge (R^2 0.73)."""
    g = torch.Generator().manual_seed(seed)
    weight = model.lm_head.weight.data
    u, c = torch.linalg.qr(torch.randn(weight.shape[1], 2, generator=g))[0].T
    t = ((torch.arange(100) - 49.5) / 50).unsqueeze(1)
    weight[number_ids] = weight[number_ids].mean(0) + weight.norm(dim=1).mean() * (t * u - t**2 * c)


def soft_number_targets(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per box number (0-99), a target distribution over the 100 number tokens: a Gaussian of `sigma`
    hundredths around it. Saying 0.31 for 0.33 is nearly right; a one-hot target says it is as wrong as
    0.90, and leaves the language model no slope to climb from a uniform guess (it sat at chance)."""
    grid = torch.arange(100, dtype=torch.float32)
    q = torch.exp(-0.5 * ((grid.unsqueeze(0) - values.float().unsqueeze(1)) / sigma) ** 2)
    return q / q.sum(-1, keepdim=True)


def lm_step(model, heads: VisionHeads, batch: dict, number_ids: torch.Tensor, one_ids: torch.Tensor, image_word_weight: float = 1.0,
            attention_weight: float = 1.0, number_sigma: float = 2.0, number_weight: float = 1.0) -> dict:
    ids, labels = batch["input_ids"], batch["labels"]
    out = model(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                output_hidden_states=True, output_attentions=bool(attention_weight))
    # The answers' and the boxes' tokens each get a mean of their own: a box has ~20 taught tokens to an
    # answer's two, and in one mean the box digits (hard, learnt last) drown the answers' signal.
    targets = labels[:, 1:]
    per_token = F.cross_entropy(out.logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
    taught = targets != -100
    answer_at = batch["answer_at"]
    answer_from = torch.where(answer_at >= 0, answer_at, 10**9)  # a box example has no answer
    in_answer = taught & (torch.arange(1, ids.shape[1]).unsqueeze(0) >= answer_from.unsqueeze(1))
    in_box = taught & ~in_answer
    answer_loss = per_token[in_answer].mean()
    # Within a box, the numbers' two-digit tokens ("46" of "0.46") carry it; its brackets, commas and "0."
    # are learnt in the first hundred steps and would otherwise outweigh them three to one.
    in_number = in_box & torch.isin(targets, number_ids)
    box_loss = per_token.sum() * 0
    number_error = number_probe_error = None
    if in_number.any():
        # Soft ordinal targets (soft_number_targets) over the whole vocabulary's softmax; a "1." number
        # (1.00) keeps its one-hot target, since "00" after "1." is 100, not a neighbour of 01.
        value_of = torch.full((out.logits.shape[-1],), -1, dtype=torch.long)
        value_of[number_ids] = torch.arange(100)
        values = value_of[targets[in_number]]
        log_p = F.log_softmax(out.logits[:, :-1][in_number], -1)
        two_before = torch.full_like(targets, -1)
        two_before[:, 1:] = ids[:, :-2]  # targets[j] is ids[j + 1]: "1" "." "00" puts the "1" at ids[j - 1]
        after_one = torch.isin(two_before[in_number], one_ids)
        soft = soft_number_targets(values, number_sigma) if number_sigma > 0 else F.one_hot(values, 100).float()
        soft[after_one] = F.one_hot(values[after_one], 100).float()
        box_loss = box_loss + number_weight * -(soft * log_p[:, number_ids]).sum(-1).mean()
        said = log_p[:, number_ids].argmax(-1)
        # The number probe: the last hidden state where a number is said must hold its value as one linear
        # read. The soft targets alone left the hidden state and the number rows each waiting for the other.
        value = torch.where(after_one, 1.0, values.float() / 100)
        number_probe = F.l1_loss(heads.number(out.hidden_states[-1][:, :-1][in_number]).squeeze(-1), value) * 10
        box_loss = box_loss + number_probe
        number_probe_error = number_probe.item() * 10  # in hundredths
        number_error = float((said - values).abs().float().mean())
    if (in_box & ~in_number).any():
        box_loss = box_loss + 0.25 * per_token[in_box & ~in_number].mean()
    # The image-word loss: each projected image token, read by the language model's own head, says
    # what its patch shows (the dot's colour word on crops, else its sign's colour word; data.py's
    # patch_words). Then an answer is one attention hop from the token that holds it, a path the
    # answer loss alone finds only after thousands of steps.
    lm = model.model.language_model
    at_images = ids == model.config.image_token_index
    words = batch["patch_words"]
    word_logits = model.lm_head(lm.norm(out.hidden_states[0][at_images]))
    has_word = words != -100
    word_loss = F.cross_entropy(word_logits, words, ignore_index=-100)
    # The box probe: each full-image token that shows a sign must hold that sign's box as a linear read
    # (the numbers a box head then copies; data.py's patch_boxes).
    boxes = batch["patch_boxes"]
    has_box = boxes[:, 0] >= 0
    probe_loss = (F.l1_loss(heads.token_box(out.hidden_states[0][at_images][has_box]), boxes[has_box]) * 10
                  if has_box.any() else per_token.sum() * 0)
    loss = answer_loss + box_loss + image_word_weight * word_loss + probe_loss
    metrics: dict = {"loss_tensor": loss, "loss": per_token[taught].mean().item(), "answer_loss": answer_loss.item(),
                     "box_loss": box_loss.item(), "image_word_loss": word_loss.item(), "token_box_l1": probe_loss.item() / 10,
                     "image_word_acc": float((word_logits[has_word].argmax(-1) == words[has_word]).float().mean())}
    if number_error is not None:
        metrics["box_number_error"] = number_error  # mean |said - true| in hundredths, teacher-forced
        metrics["number_probe_error"] = number_probe_error
    # The attention loss: at each position that predicts an answer or a box number, the heads data.py's
    # focus names put their attention on the image tokens that show what the token needs (the asked sign
    # on the full image, its dot on the crop; per box number, the sign setting that edge). That is where
    # the answer loss alone sat on a plateau: it has to find both which token to read and what to say at once.
    if attention_weight and batch["focus"]:
        per_head: dict[tuple[int, int], list[torch.Tensor]] = {}
        for b, q, keys, where in batch["focus"]:
            for layer, head in where:
                per_head.setdefault((layer, head), []).append(out.attentions[layer][b, head, q, keys].sum())
        attention_loss = sum(-torch.log(torch.stack(mass) + 1e-6).mean() for mass in per_head.values())
        metrics["loss_tensor"] = loss + attention_weight * attention_loss
        metrics["attention_loss"] = attention_loss.item()
    # Teacher-forced accuracy of the first answer token and of the box tokens, per kind of example.
    preds = out.logits.argmax(-1)
    for i, kind in enumerate(batch["kinds"]):
        at, box_at = int(batch["answer_at"][i]), int(batch["box_at"][i])
        if at >= 0:
            metrics.setdefault(f"acc_{kind}", []).append(float(preds[i, at - 1] == ids[i, at]))
        if box_at >= 0:
            t = box_at
            ok = []
            while t < ids.shape[1] and labels[i, t] != -100:
                ok.append(float(preds[i, t - 1] == ids[i, t]))
                t += 1
            metrics.setdefault("acc_box_tokens", []).append(sum(ok) / len(ok))
    return {k: (sum(v) / len(v) if isinstance(v, list) else v) for k, v in metrics.items()}


if __name__ == "__main__":
    raise SystemExit(main())
