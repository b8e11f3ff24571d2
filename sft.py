"""Supervised fine-tuning on long chains of thought: JSONL rows -> (tokens, loss mask) -> AdamW -> an HF folder.

    python sft.py --data traces.jsonl --out runs/sft --epochs 3
    torchrun --nproc_per_node 8 sft.py --data traces.jsonl --out runs/sft --epochs 3      (FSDP2)
    python sft.py --data traces.jsonl --out runs/sft --epochs 3 --resume                  (after a crash)

Reading order: arguments, setup (processes, model, optimizer), data (rows -> chats -> token ids and
labels -> packed micro-batches), the loop (loss, schedule, step, evaluation, logging), saving.

What it does, and why:
- The loss is on the last assistant turn only, including its end-of-turn token: the mask comes out of
  the same function that renders the chat (model.Tokenizer.render, the model's own chat template):
  the prompt exactly as sampling sends it, then the turn as written (its <think> not repeated when
  the template opened one). Earlier turns are context as the template renders them. A row longer
  than --max-len is dropped and counted, never truncated (a cut row may have no answer left to learn).
- Rows are packed without padding into one sequence of at most --batch-tokens tokens, with positions
  restarting at 0 for every document and attention kept inside each document (cu_seqlens), so a
  packed micro-batch computes exactly what its rows would one by one (tests/test_sft.py proves it).
- The loss comes from the final hidden states through kernels.linear_cross_entropy, in chunks of rows:
  no tokens x vocabulary logits tensor, which at 16k tokens and a 152k vocabulary would be 9.7 GB.
  It is summed, then divided by the number of target tokens of the whole optimizer step (all
  micro-batches of all ranks), so every target token weighs the same however rows are batched.
- One optimizer step = --grad-accum micro-batches, counted over all ranks: the same command trains the
  same way on 1 or 8 processes (rank r takes micro-batches r, r + W, ...).
- Weights stay fp32; on GPU the forward runs under bf16 autocast, the same arithmetic in one process
  or many (FSDP2 gathers the fp32 weights and reduces gradients in fp32).

Output (--out DIR): DIR itself is the final model, an HF folder (config.json, model.safetensors,
tokenizer files, run.json, metrics.jsonl) that model.load_model and transformers both load. Beside it,
DIR/step-<N>/ are checkpoints: the same HF files plus trainer_state.pt (optimizer state gathered in
full, so a run may resume on a different number of processes, plus step and the settings
that fix the data order); a checkpoint counts once trainer_state.pt exists (written last, atomically).
--resume continues from the newest checkpoint, leaves a finished run as it is, and refuses settings,
data or starting weights that differ from the run's (run.json's "fingerprint" names them).

What it is not: a trainer framework. No LoRA, no sequence parallelism, no tensor parallelism.
"""
import argparse, contextlib, json, math, os, resource, shutil, time
from collections import Counter, namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import kernels
from model import (ArgumentParser, Config, Transformer, Tokenizer, UserError, append_record, cli, folder_fingerprint,
                   json_object, load_model, number, output_lock, pick_device, pick_dtype, read_records, refuse_changes,
                   remove_leftovers, run_manifest, save_model, sha256_file, trace_turn, user_errors, user_prompt,
                   write_json_atomic)

DEFAULT_MODEL = Path(__file__).resolve().parent / "checkpoints" / "smollm2-135m-instruct"
IGNORE = -100
# dense bf16 peak of the GPUs we know, for MFU; on other devices MFU is left out
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


# ----------------------------------------------------------------------------- arguments

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where the help explains its own or there is nothing to show."""
    def _get_help_string(self, action):
        explained = "default" in action.help or action.default is None or action.default is False
        return action.help if explained else super()._get_help_string(action)


def parse_args(argv=None):
    p = ArgumentParser(description="Fine-tune a causal LM on JSONL chains of thought.", formatter_class=HelpFormatter)
    add = p.add_argument
    add("--data", required=True, help="training JSONL: trace rows {problem, thinking, solution}, "
        "{messages: [{role, content}]} or ShareGPT {conversations: [{from, value}]}")
    add("--model", default=str(DEFAULT_MODEL), help="HF model folder to start from (safetensors)")
    add("--out", type=Path, default="runs/sft", help="the final model, its step-<N>/ checkpoints, metrics.jsonl")
    add("--epochs", type=number(1), default=1, help="passes over the data (ignored with --max-steps)")
    add("--max-steps", type=number(1), help="optimizer steps (overrides --epochs; data is reshuffled when it runs out)")
    add("--lr", type=number(0, kind=float, above=True), default=1e-5, help="peak learning rate")
    add("--warmup-steps", type=number(0), help="linear warmup steps (overrides --warmup-ratio)")
    add("--warmup-ratio", type=number(0, 1, float), default=0.05, help="warmup as a fraction of all steps")
    add("--min-lr-ratio", type=number(0, 1, float), default=0.0, help="cosine decay ends at lr * this")
    add("--weight-decay", type=number(0, kind=float), default=0.0, help="AdamW weight decay, on matrices only")
    add("--grad-clip", type=number(0, kind=float), default=1.0, help="clip the gradient norm to this (0: no clipping)")
    add("--batch-tokens", type=number(1), help="tokens per micro-batch (default: --max-len)")
    add("--grad-accum", type=number(1), help="micro-batches per step, all processes together (default: 1 per process)")
    add("--max-len", type=number(1), help="drop rows longer than this many tokens (default: max_position_embeddings)")
    add("--pack", action=argparse.BooleanOptionalAction, default=True, help="pack rows (else one per micro-batch)")
    add("--skip-bad", action="store_true", help="skip and count malformed rows instead of stopping")
    add("--chat-template-kwargs", type=json_object, default={}, metavar="JSON",
        help="keywords for the model's chat template, e.g. '{\"enable_thinking\": true}' (Qwen3)")
    add("--eval-data", help="held-out JSONL (same formats) for eval_loss")
    add("--eval-every", type=number(0), default=0, help="eval every N steps (0: only before and after)")
    add("--save-every", type=number(0), default=500, help="checkpoint every N steps (0: only the final model)")
    add("--keep-last", type=number(0), default=2, help="keep the newest N checkpoints (0: keep all)")
    add("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    add("--grad-checkpointing", action="store_true", help="recompute blocks in the backward (less memory)")
    add("--compile", action="store_true", help="torch.compile each block")
    add("--seed", type=int, default=0, help="seed of the data order")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when torch sees a GPU, else cpu")
    add("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="compute dtype (autocast); weights "
        "and optimizer state stay float32. auto: bfloat16 on GPU, float32 on CPU")
    add("--chunk-size", type=number(1), help="rows (tokens) per chunk of the loss: a chunk's logits are chunk x vocab "
        "(default: the largest power of two with at most 2^26 logits per chunk, e.g. 256 rows for a 152k vocabulary)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- setup

Dist = namedtuple("Dist", "rank world device mesh", defaults=[None])  # this process among torchrun's, or alone


def setup_processes(device_arg):
    """One process, or one of torchrun's: gloo on CPU, nccl on GPU, one GPU per process."""
    device = pick_device(device_arg)
    if "RANK" not in os.environ:
        return Dist(0, 1, torch.device(device))
    from torch.distributed.device_mesh import init_device_mesh
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device(device), mesh)


class LossModel(torch.nn.Module):
    """The decoder and its loss as one module. Under FSDP2 this is the root, so its own parameters
    (embeddings, final norm, the possibly tied head) stay gathered through the loss as well."""

    def __init__(self, model, dtype, chunk_size=None):
        super().__init__()
        self.model, self.dtype, self.chunk_size = model, dtype, chunk_size
        if dtype != torch.float32:
            # Autocast runs the projections in bf16 but not the embedding lookup, so the residual stream
            # would stay fp32, q and k (rotated with angles in its dtype) would come out fp32 and v bf16,
            # and attention refuses mixed dtypes. Casting the embeddings makes the stream bf16, as in a
            # model loaded in bf16; the weights, their gradients and the optimizer stay fp32.
            model.model.embed_tokens.register_forward_hook(lambda module, args, out: out.to(dtype))

    def forward(self, ids, labels, positions, cu_seqlens=None):
        """Summed cross-entropy over the labelled tokens (labels already shifted, IGNORE elsewhere)."""
        with torch.autocast(ids.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            hidden = self.model(ids, positions, cu_seqlens=cu_seqlens, return_hidden=True)  # (1, T, C)
        # as transformers under autocast: logits in the compute dtype, the loss itself in fp32
        hidden = hidden.flatten(0, 1).to(self.dtype)                                      # (T, C)
        weight = self.model.lm_head.weight.to(self.dtype)                                 # (V, C)
        return kernels.linear_cross_entropy(hidden, weight, labels.flatten(), ignore_index=IGNORE,
                                            reduction="sum", chunk_size=self.chunk_size)


def build_model(folder, args, procs, dtype):
    model = load_model(folder, device=procs.device, dtype=torch.float32)
    model.gradient_checkpointing = args.grad_checkpointing
    lm = LossModel(model, dtype, args.chunk_size).train()
    if procs.world > 1:  # shard each block, then the root (embeddings, norm, head)
        from torch.distributed.fsdp import fully_shard
        for block in model.model.layers:
            fully_shard(block, mesh=procs.mesh)
        fully_shard(lm, mesh=procs.mesh)
    if args.compile:
        for block in model.model.layers:
            block.compile(dynamic=True)  # packed micro-batches vary in length
    return lm


def build_optimizer(lm, args, device):
    """AdamW; weight decay on matrices only (not on norms and biases)."""
    groups = [{"params": [p for p in lm.parameters() if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in lm.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    cuda = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda, foreach=not cuda)


# ----------------------------------------------------------------------------- data

# ShareGPT's "from" -> the chat role
SPEAKERS = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def to_messages(row):
    """One JSONL row, in any of the three formats, -> chat messages. ValueError says what is wrong (about
    each turn's role and content: Tokenizer.render, which renders them)."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        if not isinstance(row["messages"], list) or not all(isinstance(m, dict) for m in row["messages"]):
            raise ValueError("'messages' must be a list of {role, content} objects")
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in row["messages"]]
    elif "conversations" in row:
        turns = row["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) and t.get("from") in SPEAKERS for t in turns):
            raise ValueError("'conversations' must be a list of {from: system|human|gpt, value} objects")
        messages = [{"role": SPEAKERS[t["from"]], "content": t.get("value")} for t in turns]
    elif "problem" in row:
        for key in ("problem", "thinking", "solution"):
            if not isinstance(row.get(key), str) or (key != "thinking" and not row[key].strip()):
                raise ValueError(f"trace row needs a {'' if key == 'thinking' else 'non-empty '}string {key!r}")
        messages = [{"role": "user", "content": user_prompt(row["problem"])},
                    {"role": "assistant", "content": trace_turn(row["thinking"], row["solution"])}]
    else:
        raise ValueError("needs 'problem'/'thinking'/'solution', 'messages' or 'conversations'")
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or not str(messages[-1]["content"]).strip():
        raise ValueError("needs a non-empty assistant turn last, after the prompt: it is the turn trained on")
    return messages


def tokenize(messages, tok, template_kwargs=None):
    """Messages -> ids and shifted labels: labels[t] = ids[t + 1] where that token is assistant output."""
    ids, mask = tok.render(messages, **(template_kwargs or {}))
    labels = [nxt if m else IGNORE for nxt, m in zip(ids[1:], mask[1:])] + [IGNORE]
    return ids, labels


class Example(namedtuple("Example", "ids labels")):
    """A tokenized row: ids (L,) int32 and labels (L,) int32, IGNORE where nothing is learned."""
    @property
    def targets(self):
        return int((self.labels != IGNORE).sum())


def load_examples(path, tok, max_len, skip_bad=False, template_kwargs=None):
    """JSONL -> Examples and counts. Blank lines are not rows; a malformed row is an error naming its
    line (or skipped and counted); a row longer than max_len is dropped and counted, never truncated."""
    with open(path, encoding="utf-8") as f:
        rows = [(lineno, line) for lineno, line in enumerate(f, 1) if line.strip()]
    examples, counts = [], Counter(rows=len(rows))
    for lineno, line in rows:
        try:
            ids, labels = tokenize(to_messages(json.loads(line)), tok, template_kwargs)  # >= 1 target: end of turn
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            if not skip_bad:
                raise ValueError(f"{path}:{lineno}: {e} (use --skip-bad to skip such rows)") from None
            counts["bad"] += 1
            continue
        if len(ids) > max_len:
            counts["too_long"] += 1
            continue
        examples.append(Example(torch.tensor(ids, dtype=torch.int32), torch.tensor(labels, dtype=torch.int32)))
        counts.update(kept=1, tokens=len(ids), targets=examples[-1].targets)
    return examples, counts


def load_data(path, args, tok, say):
    """load_examples on --data or --eval-data, under the run's settings; a file with no usable row is refused."""
    with user_errors(path):
        examples, counts = load_examples(path, tok, args.max_len, args.skip_bad, args.chat_template_kwargs)
    say(f"{path}: {counts['kept']} of {counts['rows']} rows kept ({counts['too_long']} longer than --max-len dropped, "
        f"{counts['bad']} malformed skipped): {counts['tokens']:,} tokens, {counts['targets']:,} of them targets")
    if not examples:
        raise UserError(f"{path}: no usable rows")
    return examples, counts


def pack(lengths, order, budget, packing=True):
    """Rows in `order` -> micro-batches (lists of row indices) of at most `budget` tokens, filled in order."""
    batches, used = [], 0
    for i in order:
        if not batches or not packing or used + lengths[i] > budget:  # start a new micro-batch
            batches.append([])
            used = 0
        batches[-1].append(int(i))
        used += lengths[i]
    return batches


def make_plan(lengths, args):
    """Every optimizer step of the run, fixed in advance by the seed: a list of (epoch, fraction of the
    epoch done after this step, micro-batches). A resumed run rebuilds the same plan."""
    steps, epoch, n = [], 0, args.grad_accum
    while (len(steps) < args.max_steps) if args.max_steps else epoch < args.epochs:
        order = np.random.default_rng([args.seed, epoch]).permutation(len(lengths))
        micro = pack(lengths, order, args.batch_tokens, args.pack)
        for i in range(0, len(micro), n):
            steps.append((epoch, epoch + min(i + n, len(micro)) / len(micro), micro[i:i + n]))
        epoch += 1
    return steps[:args.max_steps] if args.max_steps else steps


def my_share(micro_batches, procs):
    """This rank's micro-batches: r, r + W, ...; padded with empty ones so every rank runs the same
    number of forward passes (FSDP's collectives must match)."""
    mine = micro_batches[procs.rank::procs.world]
    return mine + [[]] * (math.ceil(len(micro_batches) / procs.world) - len(mine))


def collate(examples, rows, device):
    """Rows -> one padding-free sequence (B = 1): ids, labels, positions restarting at 0 per document,
    and cu_seqlens (the document boundaries) when there is more than one. No rows -> one dummy
    token without a label (a no-op micro-batch for a rank with nothing left to do)."""
    docs = [examples[i] for i in rows] or [Example(torch.zeros(1, dtype=torch.int32), torch.tensor([IGNORE]))]
    lengths = [len(d.ids) for d in docs]
    batch = {"ids": torch.cat([d.ids for d in docs]).long()[None],                        # (1, T)
             "labels": torch.cat([d.labels for d in docs]).long()[None],                  # (1, T)
             "positions": torch.cat([torch.arange(n) for n in lengths])[None],            # (1, T)
             "cu_seqlens": torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32) if len(docs) > 1 else None}
    return {k: v.to(device) if v is not None else None for k, v in batch.items()}


# ----------------------------------------------------------------------------- the loop

def lr_at(step, total, args):
    """Linear warmup to --lr, then cosine down to lr * --min-lr-ratio. `step` counts from 0."""
    warmup = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_ratio * total)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_step(lm, optimizer, batches, n_targets, procs, grad_clip):
    """One optimizer step over this rank's micro-batches. Returns the step's mean loss over all ranks
    and the gradient norm (before clipping). A step whose loss or gradient norm is not finite is not
    applied: the caller stops there."""
    loss_sum = torch.zeros((), device=procs.device)
    for batch in batches:
        loss = lm(**batch)  # summed over the micro-batch's target tokens
        # / n_targets: a mean over every target of the step; * world: FSDP averages gradients over
        # ranks, and we want their sum
        (loss * (procs.world / n_targets)).backward()
        loss_sum += loss.detach()
    if procs.world > 1:
        dist.all_reduce(loss_sum)
    grad_norm = torch.nn.utils.clip_grad_norm_(lm.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    loss, grad_norm = loss_sum.item() / n_targets, grad_norm.item()
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


@torch.no_grad()
def evaluate(lm, examples, args, procs):
    """Mean loss per target token over the held-out rows, packed as training packs, the micro-batches
    shared across ranks."""
    micro_batches = pack([len(e.ids) for e in examples], range(len(examples)), args.batch_tokens, args.pack)
    lm.eval()
    total = torch.zeros((), device=procs.device)
    for rows in my_share(micro_batches, procs):
        total += lm(**collate(examples, rows, procs.device))
    if procs.world > 1:
        dist.all_reduce(total)
    lm.train()
    return total.item() / sum(e.targets for e in examples)


def step_flops(config, doc_lengths):
    """Model FLOPs of one training step (bench/sft.py's MFU too): 6 per matmul weight per token (the
    head counts even when tied; the embedding lookup is no matmul), plus causal attention per document
    (forward 2 * H * D * L^2 per layer, backward 2.5x that). Recomputation is not counted."""
    c, D = config, config.head_dim
    per_layer = c.hidden_size * (D * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 3 * c.intermediate_size)
    matmul_weights = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size
    attn = 3.5 * 2 * c.num_hidden_layers * c.num_attention_heads * D
    return 6 * matmul_weights * sum(doc_lengths) + attn * sum(n * n for n in doc_lengths)


def step_speed(config, doc_lengths, seconds, procs):
    """Throughput, MFU (on GPUs whose peak we know) and peak memory of a step."""
    if procs.device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated(procs.device) / 1e9
        peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name(procs.device)), None)
    else:
        peak_gb, peak_flops = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, None  # Linux reports KiB
    record = {"tokens_per_s": round(sum(doc_lengths) / seconds, 1), "peak_mem_gb": round(peak_gb, 3)}
    if peak_flops:
        record["mfu"] = round(step_flops(config, doc_lengths) / (seconds * peak_flops * procs.world), 4)
    return record


# ----------------------------------------------------------------------------- save / resume

def checkpoints(out):
    """Complete checkpoints in `out`, oldest first: step-<N> folders whose trainer_state.pt exists."""
    found = [p for p in Path(out).glob("step-*") if p.name[5:].isdigit() and (p / "trainer_state.pt").exists()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def write_model(lm, folder, manifest, args, procs):
    """The model's weights, gathered in full on rank 0 under FSDP, -> an HF folder that rank 0 writes
    atomically (model.save_model). fp32, so that a resume is exact."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if procs.rank == 0:
        with torch.device("meta"):
            model = Transformer(lm.model.config)
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, assign=True,  # LossModel's keys
                              strict=not model.config.tie_word_embeddings)
        model.tie_weights()
        save_model(model, folder, tokenizer_from=args.model, extra_files={"run.json": manifest})


def save_checkpoint(lm, optimizer, out, state, manifest, args, procs):
    """<out>/step-<N>/: the HF folder + trainer_state.pt (the optimizer state gathered in full), written
    last so that its presence means complete. Then only the newest --keep-last are kept."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    folder = out / f"step-{state['step']}"
    write_model(lm, folder, {**manifest, "step": state["step"], "metrics": state["last_metrics"]}, args, procs)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizer_state = get_optimizer_state_dict(lm, optimizer, options=options)
    if procs.rank == 0:
        tmp = folder / f".trainer_state.pt.tmp-{os.getpid()}"
        torch.save({**state, "optimizer": optimizer_state}, tmp)
        os.replace(tmp, folder / "trainer_state.pt")
        for old in checkpoints(out)[:-args.keep_last] if args.keep_last > 0 else []:
            shutil.rmtree(old)
    if procs.world > 1:
        dist.barrier()
    return folder


def export_final(lm, out, args, manifest, procs):
    """The final model into <out> itself. save_model replaces a whole folder, and <out> also holds the
    checkpoints, so the model goes to a staging folder first and its files move in one by one:
    config.json goes first out and last in, so <out> loads as a model only once every file is new."""
    staging = out / ".final"
    write_model(lm, staging, manifest, args, procs)
    if procs.rank == 0:
        for old in [out / "config.json", *out.glob("model*.safetensors*")]:
            old.unlink(missing_ok=True)
        for f in sorted(staging.iterdir(), key=lambda f: f.name == "config.json"):
            os.replace(f, out / f.name)
        staging.rmdir()
    if procs.world > 1:
        dist.barrier()


def run_fingerprint(args, dtype):
    """Everything that changes the result: data, starting weights (folder_fingerprint), settings. A
    resume must match it. Not here: speed settings (--grad-checkpointing, --compile, --eval-every,
    --save-every, --keep-last) and the number of processes (though the default --grad-accum is)."""
    keys = ("seed", "epochs", "max_steps", "max_len", "batch_tokens", "grad_accum", "pack", "lr", "warmup_steps",
            "warmup_ratio", "min_lr_ratio", "weight_decay", "grad_clip", "chunk_size", "skip_bad")
    return {"data_sha256": sha256_file(args.data), "eval_data_sha256": args.eval_data and sha256_file(args.eval_data),
            "model_fingerprint": folder_fingerprint(args.model), "dtype": str(dtype).removeprefix("torch."),
            **{k: getattr(args, k) for k in keys},
            # it changes the tokens; only when given, so that older checkpoints still resume
            **({"chat_template_kwargs": args.chat_template_kwargs} if args.chat_template_kwargs else {})}


def restore(ckpt, optimizer, lm):
    """Load trainer_state.pt of a checkpoint into the optimizer; returns its step and progress. (No RNG
    state: nothing in a step draws random numbers: no dropout, and the data order comes from the seed.)"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    set_optimizer_state_dict(lm, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    return state["step"], state["progress"]


def truncate_metrics(path, step):
    """A killed run may have logged steps after its last checkpoint; they are redone, so drop them
    (all of them when starting from step 0), and a line torn by the kill."""
    kept = [r for r in read_records(path) if step > 0 and r["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))  # as append_record writes them
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main

# what a killed run leaves in --out: temporary folders and files of save_model, save_checkpoint,
# export_final, truncate_metrics and write_json_atomic (a checkpoint without trainer_state.pt, too)
LEFTOVERS = (".step-*.tmp-*", ".step-*.old-*", "step-*/.trainer_state.pt.tmp-*", ".final", "..final.*",
             ".metrics.jsonl.tmp", ".run.json.tmp-*")


def claim(out):
    """Make sure --out is ours before anything in it is changed: new, empty, or made by sft.py (its
    run.json, written once the model loads, carries the run's fingerprint). Then clear what a killed
    run of ours left behind."""
    run = out / "run.json"
    if any(out.iterdir()) and not (run.exists() and "fingerprint" in json.loads(run.read_text())):
        raise UserError(f"--out {out} holds files that sft.py did not write (no sft.py run.json): choose another --out")
    remove_leftovers(out, *LEFTOVERS)
    for folder in out.glob("step-*"):
        if folder.is_dir() and not (folder / "trainer_state.pt").exists():
            shutil.rmtree(folder)


def starting_point(args, out, fingerprint, say):
    """Where the run starts: None (the base model), the newest complete checkpoint (--resume), or
    "finished" when --resume finds this very run's final model in --out. A run is never mixed with
    another: without --resume an existing run is refused, and with it any setting that differs."""
    source = out if (out / "config.json").exists() else (checkpoints(out) or [None])[-1]
    if source is None:
        if args.resume:
            say(f"--resume: no complete checkpoint in {out}, starting from {args.model}")
        return None
    if not args.resume:
        raise UserError(f"{out} already holds a model or checkpoints: pass --resume, or choose another --out")
    refuse_changes(json.loads((source / "run.json").read_text()).get("fingerprint", {}), fingerprint,
                   f"--resume: {source} was made with settings that change the result ({{}}). "
                   "Use the same settings, or another --out")
    return "finished" if source == out else source


def resolve_sizes(args, config, procs):
    """Defaults that depend on the model and the number of processes, and their checks."""
    context = config.max_position_embeddings
    args.max_len = args.max_len or context
    if args.max_len > context:
        raise UserError(f"--max-len must be in [1, {context}] (the model's context), got {args.max_len}")
    args.batch_tokens = args.batch_tokens or args.max_len
    args.grad_accum = args.grad_accum or procs.world
    if args.batch_tokens < args.max_len:
        raise UserError(f"--batch-tokens {args.batch_tokens} < --max-len {args.max_len}: the longest rows cannot fit")
    if args.grad_accum % procs.world:
        raise UserError(f"--grad-accum {args.grad_accum} is not a multiple of the {procs.world} processes")


def main(argv=None):
    args = parse_args(argv)
    procs = setup_processes(args.device)
    with output_lock(args.out, folder=True) if procs.rank == 0 else contextlib.nullcontext():
        return train(args, procs, args.out)


def train(args, procs, out):
    """main() once --out is ours alone."""
    started = time.time()
    say = print if procs.rank == 0 else (lambda *a, **k: None)
    if procs.rank == 0:
        claim(out)
    dtype = pick_dtype(args.dtype, procs.device.type)
    with user_errors(args.model):
        resolve_sizes(args, Config.from_json(Path(args.model) / "config.json"), procs)
    fingerprint = run_fingerprint(args, dtype)
    ckpt = starting_point(args, out, fingerprint, say)
    if ckpt == "finished":
        say(f"{out} already holds the final model of this run (same settings): nothing to do")
        return out

    # setup
    with user_errors(args.model):
        tok = Tokenizer(args.model)
        lm = build_model(ckpt or args.model, args, procs, dtype)
    optimizer = build_optimizer(lm, args, procs.device)

    # data
    examples, counts = load_data(args.data, args, tok, say)
    held_out = load_data(args.eval_data, args, tok, say)[0] if args.eval_data else None
    plan = make_plan([len(e.ids) for e in examples], args)
    total = len(plan)
    say(f"{total} steps of {args.grad_accum} micro-batches of <= {args.batch_tokens} tokens, {procs.world} "
        f"process(es), {procs.device}, {str(dtype).removeprefix('torch.')} compute")

    # where the run stands
    manifest = run_manifest({**vars(args), "world_size": procs.world, "data_counts": dict(counts)},
                            [p for p in (args.data, args.eval_data) if p], args.model) | {"fingerprint": fingerprint}
    start, progress = restore(ckpt, optimizer, lm) if ckpt else (0, {"tokens": 0, "train_s": 0.0})
    if ckpt:
        manifest["resumed_from"] = str(ckpt)
        say(f"resumed from {ckpt} at step {start}")
    metrics_path = out / "metrics.jsonl"
    if procs.rank == 0:
        write_json_atomic(out / "run.json", manifest)  # marks --out as an sft.py output (see claim)
        truncate_metrics(metrics_path, start)
    loss = eval_loss = None
    if held_out and start == 0:
        eval_loss = evaluate(lm, held_out, args, procs)
        say(f"step 0: eval_loss {eval_loss:.4f}")
        if procs.rank == 0:
            append_record(metrics_path, {"step": 0, "eval_loss": eval_loss})

    # the loop; `step` counts from 1: the step being taken
    bar = tqdm(total=total, initial=start, disable=procs.rank != 0, dynamic_ncols=True)
    for step, (epoch, epoch_done, micro) in enumerate(plan[start:], start + 1):
        lr = lr_at(step - 1, total, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [collate(examples, rows, procs.device) for rows in my_share(micro, procs)]
        n_targets = sum(examples[i].targets for rows in micro for i in rows)  # every rank knows the whole plan
        t0 = time.perf_counter()
        loss, grad_norm = train_step(lm, optimizer, batches, n_targets, procs, args.grad_clip)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise RuntimeError(f"step {step}: loss {loss}, gradient norm {grad_norm}; stopped before the update. "
                               f"The last good checkpoint is {ckpt or 'none (no checkpoint was written)'}")
        if procs.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        docs = [len(examples[i].ids) for rows in micro for i in rows]
        progress = {"tokens": progress["tokens"] + sum(docs), "train_s": progress["train_s"] + seconds}
        record = {"step": step, "epoch": round(epoch_done, 4), "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens": sum(docs), "targets": n_targets, **step_speed(lm.model.config, docs, seconds, procs)}
        if held_out and (step == total or args.eval_every and step % args.eval_every == 0):
            record["eval_loss"] = eval_loss = evaluate(lm, held_out, args, procs)
        if procs.rank == 0:
            append_record(metrics_path, record)
            bar.update(1)
            bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        if args.save_every and step % args.save_every == 0 and step < total:
            ckpt = save_checkpoint(lm, optimizer, out, {"step": step, "epoch": epoch, "fingerprint": fingerprint,
                                   "progress": progress, "last_metrics": record}, manifest, args, procs)
    bar.close()

    # save
    manifest.update(steps=total, train_tokens=progress["tokens"], train_s=round(progress["train_s"], 1),
                    wall_s=round(time.time() - started, 1), final_loss=loss, final_eval_loss=eval_loss)
    export_final(lm, out, args, manifest, procs)
    say(f"final model: {out}")
    if procs.world > 1:
        dist.destroy_process_group()
    return out


if __name__ == "__main__":
    cli(main)
