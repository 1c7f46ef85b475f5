"""How long a run trains and how its LR schedule is counted, as Megatron-LM counts them.

A run is counted in iterations (--train-iters, --lr-*-iters) or in samples (--train-samples,
--lr-*-samples, optionally --rampup-batch-size); megatron-core's OptimizerParamScheduler counts samples
either way, so both become the same four numbers here. The batch-size ramp is Megatron-LM's (megatron-core
0.16's RampupBatchsizeNumMicroBatchesCalculator; 0.19 replaced it by step schedules), written out so that
both releases train the same batches.
"""

from __future__ import annotations


def global_batch_at(consumed_samples: int, args) -> int:
    """The global batch of the iteration that starts after `consumed_samples` samples."""
    if not args.rampup_batch_size:
        return args.global_batch_size
    start, increment, ramp_samples = (int(x) for x in args.rampup_batch_size)
    if consumed_samples > ramp_samples or start == args.global_batch_size:
        return args.global_batch_size
    per_increment = ramp_samples / ((args.global_batch_size - start) // increment)
    return start + int(consumed_samples / per_increment) * increment


def iterations_for_samples(args) -> int:
    """--train-samples as iterations (a last partial batch is not trained), ramp included."""
    if not args.rampup_batch_size:
        return args.train_samples // args.global_batch_size
    iterations, consumed = 0, 0
    ramp_samples = int(args.rampup_batch_size[2])
    while consumed <= ramp_samples and consumed <= args.train_samples:
        consumed += global_batch_at(consumed, args)
        iterations += 1
    return iterations + max(args.train_samples - consumed, 0) // args.global_batch_size


def scheduler_steps(args) -> dict[str, float | None]:
    """OptimizerParamScheduler's warmup, decay, weight-decay and WSD lengths, in samples."""
    gbs = args.global_batch_size
    if args.train_samples is None:
        decay = (args.lr_decay_iters or args.train_iters) * gbs
        warmup = args.lr_warmup_iters * gbs
        wd_incr = args.train_iters * gbs
        wsd = args.lr_wsd_decay_iters * gbs if args.lr_wsd_decay_iters is not None else args.lr_wsd_decay_samples
    else:
        decay = args.lr_decay_samples or args.train_samples
        warmup, wd_incr, wsd = args.lr_warmup_samples, args.train_samples, args.lr_wsd_decay_samples
    if args.lr_warmup_fraction is not None:
        warmup = args.lr_warmup_fraction * decay
    return {"lr_warmup_steps": warmup, "lr_decay_steps": decay, "wd_incr_steps": wd_incr, "wsd_decay_steps": wsd}


def ramp_problem(args) -> str | None:
    """Why --rampup-batch-size cannot run with this batch layout, or None."""
    try:
        start, increment, ramp_samples = (int(x) for x in args.rampup_batch_size)
    except ValueError:
        return f"--rampup-batch-size {' '.join(args.rampup_batch_size)}: expected three integers"
    step = args.micro_batch_size * args.data_parallel_size
    if start < 1 or increment < 1 or ramp_samples < 0:
        return "--rampup-batch-size: start and increment must be at least 1, samples at least 0"
    if start > args.global_batch_size or (args.global_batch_size - start) % increment:
        return (f"--rampup-batch-size {start} {increment}: the ramp must reach --global-batch-size "
                f"{args.global_batch_size} in whole increments")
    if start == args.global_batch_size:
        return None
    if start % step or increment % step:
        return (f"--rampup-batch-size {start} {increment}: every batch of the ramp must be a multiple of "
                f"--micro-batch-size {args.micro_batch_size} x data-parallel size {args.data_parallel_size}")
    return None


def describe(args) -> str:
    """'N iterations' or 'N samples (M iterations)', for the start-up line."""
    if args.train_samples is None:
        return f"{args.train_iters} iterations"
    return f"{args.train_samples} samples ({args.train_iters} iterations)"

