#!/usr/bin/env python3
"""respawn's GPU sample job: a small MLP trained with PyTorch, following respawn's
checkpoint contract (the same one as the Rust sample, examples/trainer).

- RESPAWN_INPUT_DIR: the data; --data FILE, else the first *.csv in it (shallowest
  first, then by path). CSV: a header row, numeric feature columns, the class label
  last (integers 0..k-1, or names numbered in sorted order).
- RESPAWN_CHECKPOINT_DIR: <step>/state.pt, then an empty <step>/.complete written last
  (after state.pt is fsync'd). A run resumes from the newest complete checkpoint and
  keeps the newest 2 on local disk; respawn uploads complete ones.
- RESPAWN_OUTPUT_DIR: model.pt and metrics.json at the end.
- SIGTERM (preemption notice): finish the step, checkpoint, print
  "checkpointed step N on SIGTERM", exit 143.

Mini-batches are a pure function of (seed, step), so a resumed run needs no RNG state
and, with deterministic kernels on the same kind of device, trains exactly as an
uninterrupted run.

Multi-node, under torchrun (one process per GPU; on respawn's multi-node contract:
torchrun --nnodes=$RESPAWN_NUM_NODES --node_rank=$RESPAWN_NODE_RANK
--nproc_per_node=<GPUs per node> --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT
train.py ...): DistributedDataParallel over NCCL (gloo on CPUs), each process
taking its share of every step's batch, so the update is the same batch's as on one
process. A SIGTERM on any process stops all of them after the same step; rank 0 alone
writes checkpoints and outputs, and every rank must have restored the same step.

Exit codes: 0 done, 1 I/O error, 2 bad flags / data / checkpoint, 143 SIGTERM.
"""

import argparse
import csv
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

# cuBLAS is only deterministic with a fixed workspace; this must be set before CUDA
# initialises, so before torch is used.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

KEEP_LOCAL = 2
EXIT_IO = 1
EXIT_INPUT = 2
EXIT_SIGTERM = 143  # 128 + SIGTERM, as a shell reports a process killed by it
SEARCH_DEPTH = 2
MAX_CLASSES = 1000

# Set by the SIGTERM handler, polled between steps: a step is never cut in half.
stop_requested = False


class InputError(Exception):
    """Bad flags, data or checkpoint: a retry cannot fix it (exit code 2)."""


def on_sigterm(_signum, _frame):
    global stop_requested
    stop_requested = True


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="total SGD steps")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="K")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--hidden", type=int, default=16, metavar="H",
                   help="hidden width; 0 = multinomial logistic regression")
    p.add_argument("--step-delay-ms", type=int, default=0, metavar="D",
                   help="sleep after each step (to make preemption tests possible)")
    p.add_argument("--data", type=Path, metavar="FILE")
    args = p.parse_args()
    if args.checkpoint_every < 1 or args.batch_size < 1 or args.lr <= 0 or args.hidden < 0:
        p.error("--checkpoint-every and --batch-size must be >= 1, --lr > 0, --hidden >= 0")
    return args


def env_path(name):
    value = os.environ.get(name)
    return Path(value) if value else None


# ---------------------------------------------------------------- data


def locate_csv(data_flag, input_dir):
    if data_flag:
        return data_flag
    if input_dir is None:
        raise InputError("no training data: pass --data FILE or set RESPAWN_INPUT_DIR")
    found = []

    def walk(d, depth):
        # Hidden entries (.cache, ...) are not inputs.
        for entry in sorted(d.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir() and depth < SEARCH_DEPTH:
                walk(entry, depth + 1)
            elif entry.is_file() and entry.suffix.lower() == ".csv":
                found.append((depth, str(entry)))

    walk(input_dir, 0)
    if not found:
        raise InputError(f"no *.csv file in {input_dir}")
    return Path(min(found)[1])


def load_csv(path):
    """Features (standardised per column), labels and class names; InputError names the
    file and line of any problem."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1)
                    if any(field.strip() for field in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: {e}") from e
    if not rows:
        raise InputError(f"{path}: the file is empty")
    columns = len(rows[0][1])
    if columns < 2:
        raise InputError(f"{path}: line 1: the header needs a feature and a label column")
    features, labels = [], []
    for n, row in rows[1:]:
        if len(row) != columns:
            raise InputError(f"{path}: line {n}: expected {columns} fields, found {len(row)}")
        try:
            values = [float(v) for v in row[:-1]]
        except ValueError as e:
            raise InputError(f"{path}: line {n}: {e}") from e
        if not all(abs(v) != float("inf") and v == v for v in values):
            raise InputError(f"{path}: line {n}: not a finite number")
        label = row[-1].strip()
        if not label:
            raise InputError(f"{path}: line {n}: empty class label")
        features.append(values)
        labels.append(label)
    if not features:
        raise InputError(f"{path}: no data rows after the header")
    y, names = number_classes(labels)
    x = torch.tensor(features, dtype=torch.float64)
    sd = x.std(dim=0, unbiased=False)
    x = (x - x.mean(dim=0)) / torch.where(sd > 0, sd, torch.ones_like(sd))
    return x.float(), torch.tensor(y), names


def number_classes(labels):
    if all(label.isdigit() for label in labels):
        y = [int(label) for label in labels]
        if max(y) >= MAX_CLASSES:
            raise InputError(f"class label {max(y)} is too large")
        return y, [str(c) for c in range(max(y) + 1)]
    names = sorted(set(labels))
    index = {name: i for i, name in enumerate(names)}
    return [index[label] for label in labels], names


# ---------------------------------------------------------------- model


def build_model(features, hidden, classes):
    if hidden == 0:
        return nn.Linear(features, classes)
    return nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def batch_indices(seed, step, rows, batch):
    """The mini-batch of `step`: a fresh generator seeded from (seed, step) alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, rows, (batch,), generator=g)


def evaluate(model, x, y):
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return loss, accuracy


# ---------------------------------------------------------------- checkpoints


def fsync_dir(d):
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path, write):
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def list_steps(ckpt_dir):
    """[(step, complete)] ascending; names that are not a canonical step are not ours."""
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for entry in ckpt_dir.iterdir():
        if entry.is_dir() and entry.name.isdigit() and str(int(entry.name)) == entry.name:
            steps.append((int(entry.name), (entry / ".complete").is_file()))
    return sorted(steps)


def load_newest(ckpt_dir, device):
    """The newest complete checkpoint that reads back; unreadable ones are skipped."""
    for step, complete in reversed(list_steps(ckpt_dir)):
        if not complete:
            continue
        path = ckpt_dir / str(step) / "state.pt"
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as e:  # a corrupt file must not stop the job
            print(f"warning: skipping unreadable {path}: {e}", file=sys.stderr)
            continue
        if state.get("step") == step:
            return state
        print(f"warning: {path} holds step {state.get('step')}, skipping it", file=sys.stderr)
    return None


def save_checkpoint(ckpt_dir, step, model, optimizer, meta):
    """Writes <step>/ unless complete already (complete directories are immutable)."""
    target = ckpt_dir / str(step)
    if (target / ".complete").is_file():
        return False
    if target.exists():  # debris of a write that was killed
        shutil.rmtree(target)
    target.mkdir(parents=True)
    state = {"step": step, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "meta": meta}
    write_synced(target / "state.pt", lambda f: torch.save(state, f))
    # The marker goes last: whoever sees it may rely on state.pt being whole.
    write_synced(target / ".complete", lambda f: None)
    fsync_dir(target)
    fsync_dir(ckpt_dir)
    prune(ckpt_dir, KEEP_LOCAL)
    return True


def prune(ckpt_dir, keep):
    """Keeps the newest `keep` complete checkpoints, and drops debris older than the
    newest. Runs right after a save, so the one resumed from outlives it."""
    steps = list_steps(ckpt_dir)
    complete = [s for s, c in steps if c]
    if not complete:
        return
    oldest_kept = complete[-keep:][0]
    for step, is_complete in steps:
        if step < (oldest_kept if is_complete else complete[-1]):
            shutil.rmtree(ckpt_dir / str(step), ignore_errors=True)


# ---------------------------------------------------------------- outputs


def write_outputs(out_dir, model, meta, steps, loss, accuracy):
    out_dir.mkdir(parents=True, exist_ok=True)
    # Write then rename, so that the agent syncing the directory never uploads half a file.
    tmp = out_dir / "model.pt.tmp"
    write_synced(tmp, lambda f: torch.save({"model": model.state_dict(), "meta": meta}, f))
    os.replace(tmp, out_dir / "model.pt")
    metrics = {"steps": steps, "final_loss": loss, "train_accuracy": accuracy}
    tmp = out_dir / "metrics.json.tmp"
    write_synced(tmp, lambda f: f.write((json.dumps(metrics) + "\n").encode()))
    os.replace(tmp, out_dir / "metrics.json")
    fsync_dir(out_dir)


# ---------------------------------------------------------------- training


def pick_device():
    """CUDA when there is a GPU (torchrun's LOCAL_RANK picks which); deterministic
    kernels either way."""
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        print(f"device cuda ({torch.cuda.get_device_name(device)}), "
              f"CUDA_VISIBLE_DEVICES={visible}", flush=True)
    else:
        device = torch.device("cpu")
        print(f"device cpu (no CUDA), CUDA_VISIBLE_DEVICES={visible}", flush=True)
    return device


def join_processes(device):
    """(rank, world size): torch.distributed's, when torchrun started more than one
    process (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE in the environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    print(f"rank {rank} of {world} (rank 0 checkpoints and writes the model)", flush=True)
    return rank, world


def agree(value, device, op):
    """`value` reduced over every process with `op` (one process: itself)."""
    if not dist.is_available() or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=op)
    return int(t.item())


def pause(delay_ms):
    """--step-delay-ms, cut short by SIGTERM: the step's work is already done."""
    end = time.monotonic() + delay_ms / 1000
    while not stop_requested and time.monotonic() < end:
        time.sleep(min(0.01, max(0.0, end - time.monotonic())))


def train(args):
    ckpt_dir = env_path("RESPAWN_CHECKPOINT_DIR")
    out_dir = env_path("RESPAWN_OUTPUT_DIR")
    print(f"train.py: job {os.environ.get('RESPAWN_JOB_ID', '(unset)')} "
          f"attempt {os.environ.get('RESPAWN_ATTEMPT', '(unset)')}", flush=True)
    if os.environ.get("RESPAWN_GRACE_SECONDS"):
        print(f"grace period {os.environ['RESPAWN_GRACE_SECONDS']}s after SIGTERM")
    device = pick_device()

    path = locate_csv(args.data, env_path("RESPAWN_INPUT_DIR"))
    x, y, names = load_csv(path)
    print(f"data {path}: {len(y)} rows, {x.shape[1]} features, {len(names)} classes")
    x, y = x.to(device), y.to(device)
    meta = {"features": x.shape[1], "hidden": args.hidden, "classes": len(names),
            "class_names": names, "seed": args.seed}

    rank, world = join_processes(device)
    if rank != 0:
        ckpt_dir = out_dir = None  # rank 0 writes them; this rank only restores
    torch.manual_seed(args.seed)
    model = build_model(x.shape[1], args.hidden, len(names)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    step = resume(env_path("RESPAWN_CHECKPOINT_DIR"), device, model, optimizer, meta)
    # load_state_dict restored the checkpoint's learning rate; this run's flag wins.
    for group in optimizer.param_groups:
        group["lr"] = args.lr
    net = model
    if world > 1:
        if agree(step, device, dist.ReduceOp.MIN) != agree(step, device, dist.ReduceOp.MAX):
            raise InputError(f"rank {rank} resumed from step {step}, another rank from "
                             "another: every rank must restore the same checkpoint")
        net = nn.parallel.DistributedDataParallel(model)

    while True:
        # Every process stops before the same step when any got SIGTERM.
        stop = agree(int(stop_requested), device, dist.ReduceOp.MAX)
        if stop:
            if ckpt_dir:
                save_checkpoint(ckpt_dir, step, model, optimizer, meta)
                print(f"checkpointed step {step} on SIGTERM", flush=True)
            else:
                print(f"stopped at step {step} on SIGTERM (rank 0 checkpoints)", flush=True)
            return EXIT_SIGTERM
        if step >= args.steps:
            break
        idx = batch_indices(args.seed, step, len(y), args.batch_size).to(device)
        # This process's share of the batch; DDP averages the gradients over the
        # processes, so the sum over the share, scaled by world / batch, makes the
        # batch's mean gradient.
        share = idx[rank::world]
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(x[share]), y[share], reduction="sum")
        (loss * world / args.batch_size).backward()
        optimizer.step()
        step += 1
        pause(args.step_delay_ms)
        if step % args.checkpoint_every == 0:
            if ckpt_dir:
                save_checkpoint(ckpt_dir, step, model, optimizer, meta)
            # After the checkpoint, so that a printed step is a saved step.
            print(f"step {step} loss {evaluate(model, x, y)[0]:.6f}", flush=True)

    if ckpt_dir:  # so that a kill from here on does not redo the training
        save_checkpoint(ckpt_dir, step, model, optimizer, meta)
    loss, accuracy = evaluate(model, x, y)
    if out_dir:
        write_outputs(out_dir, model, meta, step, loss, accuracy)
    print(f"done: steps={step} loss={loss:.6f} accuracy={accuracy:.4f}", flush=True)
    return 0


def resume(ckpt_dir, device, model, optimizer, meta):
    """Restores the newest complete checkpoint into model and optimizer; returns its step."""
    state = load_newest(ckpt_dir, device) if ckpt_dir else None
    if state is None:
        print("starting from scratch", flush=True)
        return 0
    old = state.get("meta", {})
    for key in ("features", "hidden", "classes"):
        if old.get(key) != meta[key]:
            raise InputError(
                f"the checkpoint at step {state['step']} has {key}={old.get(key)}, this run "
                f"{meta[key]}: rerun with the same flags and data, or an empty "
                "RESPAWN_CHECKPOINT_DIR")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    print(f"resumed from step {state['step']}", flush=True)
    return state["step"]


def main():
    # First, so that a SIGTERM during start-up is caught rather than fatal.
    signal.signal(signal.SIGTERM, on_sigterm)
    args = parse_args()
    try:
        return train(args)
    except InputError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_IO


if __name__ == "__main__":
    sys.exit(main())
