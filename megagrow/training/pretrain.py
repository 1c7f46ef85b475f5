"""The training loop: megatron-core's pipeline schedules, DDP and optimizer, driven from Megatron-LM flags.

One screen per idea: `setup` builds everything for this rank, `train_step` runs one global batch,
`evaluate` measures validation loss, `pretrain` loops, logs, evaluates and checkpoints.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import time
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.timers import Timers
from megatron.core.transformer.module import Float16Module

from megagrow.checkpoint.errors import iteration_dir, read_tracker
from megagrow.checkpoint.trainer import load_checkpoint, save_checkpoint
from megagrow.training.ddp import ParamGatherHooks, ddp_config_from_args
from megagrow.training.freezing import FrozenLayers, layer_ranges
from megagrow.training.hyperparameters import apply_after_load, in_effect, main_param_group, values_to_build
from megagrow.checkpoint.view import run_state as read_run_state
from megagrow.data.loader import build_datasets, microbatches
from megagrow.errors import MegagrowError
from megagrow.model.gpt import build_gpt_model, transformer_config, transformer_impl
from megagrow.model.growth_masks import install_growth_masks
from megagrow.runtime.distributed import (collective_tensor, initialize_distributed, print_rank_0, print_rank_last,
                                          set_seeds)
from megagrow.runtime.versions import collect_write_results_in_process
from megagrow.scheduling.timing import StopRule
from megagrow.model.shape import expected_shapes, num_floating_point_operations, padded_vocab_size, parameter_count
from megagrow.training.metrics import MetricsLogger, params_l2_norm
from megagrow.training.profiling import Profiler
from megagrow.training.schedule import describe, global_batch_at, scheduler_steps


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-summed loss, the token count, and what to report (Megatron-LM's three-tuple form)."""
    mask = loss_mask.view(-1).float()
    loss = torch.sum(output_tensor.view(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), mask.sum()])}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


@dataclass
class TrainState:
    args: object
    model: list  # model chunks, each wrapped in megatron-core DDP
    optimizer: object
    scheduler: OptimizerParamScheduler
    datasets: tuple
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0
    masks: object = None  # growth masks (MSG/PDG) while new width is opening
    run_state: dict = None  # what is not a flag but is saved: checkpoint.view.run_state
    optimizer_at_start: dict = None  # the hyper-parameters the first iteration after --load trains with
    param_gather: ParamGatherHooks = None  # --overlap-param-gather's forward pre-hooks
    num_zeros_in_grad: int | None = None  # --log-num-zeros-in-grad
    frozen: FrozenLayers = None  # --freeze-layers
    timers: Timers = None  # megatron-core's, at --timing-log-level


def _scheduler(args, optimizer) -> OptimizerParamScheduler:
    # A restart re-builds the scheduler after loading; the loaded one must not refuse the new flags first.
    override = args.override_opt_param_scheduler or args.restart_lr_schedule_at is not None
    return OptimizerParamScheduler(
        optimizer, use_checkpoint_opt_param_scheduler=not override or args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=override and not args.use_checkpoint_opt_param_scheduler,
        init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr, **scheduler_steps(args),
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_style="constant", lr_wsd_decay_style=args.lr_wsd_decay_style)


def build_model_chunks(args, config, vocab_size: int) -> list:
    """This rank's model chunks (one, or one per virtual pipeline stage), each DDP-wrapped as in Megatron-LM:
    half precision by Float16Module (norms included, fp32 logits: the distributed optimizer's bookkeeping
    assumes no fp32 parameters remain), gradient buckets only on the first chunk."""
    vpp = args.virtual_pipeline_model_parallel_size
    ddp_config = ddp_config_from_args(args)
    chunks = []
    for i, vp_stage in enumerate(range(vpp) if vpp else [None]):
        chunk = build_gpt_model(args, config, vocab_size, vp_stage)
        if args.bf16 or args.fp16:
            chunk = Float16Module(config, chunk)
        chunks.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                              disable_bucketing=i > 0))
    return chunks


def build_tokenizer(args):
    from megagrow.data.tokenizer import tokenizer_from_args
    return tokenizer_from_args(args)


def setup(args) -> TrainState:
    initialize_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                           args.distributed_backend, args.distributed_timeout_minutes,
                           args.virtual_pipeline_model_parallel_size)
    set_seeds(args.seed)
    tokenizer = build_tokenizer(args)
    args.tokenizer_vocab_size = tokenizer.vocab_size  # lets converters re-pad the vocabulary for another TP
    args.transformer_impl = transformer_impl(args)  # recorded resolved: torch-format key names depend on it
    args.padded_vocab_size = padded_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by,
                                               args.tensor_model_parallel_size)
    config = transformer_config(args)
    model = build_model_chunks(args, config, tokenizer.vocab_size)
    built = values_to_build(args)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer=args.optimizer, lr=built["lr"], min_lr=built["min_lr"], weight_decay=built["weight_decay"],
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16, params_dtype=config.params_dtype,
        use_distributed_optimizer=args.use_distributed_optimizer, decoupled_lr=args.decoupled_lr,
        decoupled_min_lr=args.decoupled_min_lr, log_num_zeros_in_grad=args.log_num_zeros_in_grad), model)
    scheduler = _scheduler(args, optimizer)
    config.timers = Timers(args.timing_log_level, args.timing_log_option)  # the schedules time themselves too
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    def per_chunk(fns):  # megatron-core's schedules take one function, or a list with a virtual pipeline
        return fns[0] if len(fns) == 1 else fns
    config.no_sync_func = per_chunk([chunk.no_sync for chunk in model])
    if args.overlap_grad_reduce:  # pipeline schedules start each chunk's reduce early
        config.grad_sync_func = per_chunk([chunk.start_grad_sync for chunk in model])
    if args.overlap_param_gather and args.align_param_gather:
        config.param_sync_func = per_chunk([chunk.start_param_sync for chunk in model])

    state = TrainState(args, model, optimizer, scheduler, datasets=(), run_state=read_run_state({}, args),
                       timers=config.timers)
    args.num_floating_point_operations_so_far = 0  # the checkpoint's count when there is one
    if args.load:
        state.iteration, state.consumed_train_samples, state.run_state = load_checkpoint(
            args.load, model, optimizer, scheduler, args)
        if read_tracker(args.load) is not None:  # a release checkpoint (an import) loads at iteration 0
            print_rank_0(f" loaded checkpoint from {args.load} at iteration {state.iteration}")
        restarted = args.restart_lr_schedule_at is not None and state.iteration == args.restart_lr_schedule_at
        apply_after_load(optimizer, scheduler, args, restarted, built)
        if restarted:
            state.scheduler = _scheduler(args, optimizer)  # a new stage re-warms: this run's LR flags, from step 0
            print_rank_0(f" LR schedule restarted at iteration {state.iteration}")
        if state.iteration:
            state.optimizer_at_start = in_effect(optimizer, state.scheduler)
            print_rank_0(" optimizer at the first iteration: " + ", ".join(
                f"{k} {v}" for k, v in state.optimizer_at_start.items()))
        if len(model) > 1 and state.run_state.get("growth_masks"):
            raise MegagrowError(f"--load {args.load}: growth masks (MSG/PDG) with a virtual pipeline are not "
                                "supported yet: train the masked phase with one model chunk per pipeline rank")
        state.masks = install_growth_masks(model[0], args, state.run_state, state.iteration)
        if state.masks:
            r = state.run_state["growth_masks"]
            print_rank_0(f" growth masks ({r['kind']}): new width opens over iterations {r['begin']}..{r['end']}")
    state.frozen = FrozenLayers(model, optimizer, args)  # after the load: fresh frozen parameters get their state
    if state.frozen.layers:
        layer = expected_shapes(args)[1]
        total = parameter_count(args)
        trained = total - len(state.frozen.layers) * sum(math.prod(s) for s in layer.values())
        print_rank_0(f" frozen layers (--freeze-layers): {layer_ranges(state.frozen.layers)}; {trained:,} of "
                     f"{total:,} parameters train")
    state.datasets = build_datasets(args, tokenizer)
    state.param_gather = ParamGatherHooks(state.model, args.overlap_param_gather)
    return state


@contextlib.contextmanager
def memory_kept_tidy(args, level: int, evaluating: bool = False):
    """--empty-unused-memory-level (CUDA's cached blocks released after the body at this level or above) and
    --manual-gc's collections around an evaluation (unless --no-manual-gc-eval)."""
    collect = evaluating and args.manual_gc and args.manual_gc_eval
    if collect:
        gc.collect()
    yield
    if args.empty_unused_memory_level >= level and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if collect:
        gc.collect()


def _data_iterator(state: TrainState, dataset, first_sample: int):
    """The microbatch stream; with a virtual pipeline one per model chunk (the interleaved schedule reads
    each chunk's own), all the same samples."""
    a = state.args

    def stream():
        return microbatches(dataset, first_sample, a.micro_batch_size, parallel_state.get_data_parallel_rank(),
                            a.data_parallel_size, "cuda" if torch.cuda.is_available() else "cpu", a.num_workers)
    return stream() if len(state.model) == 1 else [stream() for _ in state.model]


def _reduce_loss(losses: list[dict]) -> float | None:
    """Token-weighted mean over microbatches and data-parallel ranks; None off the last stage."""
    if not parallel_state.is_pipeline_last_stage():
        return None
    total = torch.stack([m["lm loss"] for m in losses]).sum(0) if losses else collective_tensor([0.0, 0.0])
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total[0] / total[1]).item()


def train_step(state: TrainState, data_iterator, global_batch: int) -> tuple[float | None, float | None, bool]:
    a, timers = state.args, state.timers
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    losses = get_forward_backward_func()(  # times itself ("forward-backward", ...) on config.timers
        forward_step_func=forward_step, data_iterator=data_iterator, model=state.model,
        num_microbatches=global_batch // (a.micro_batch_size * a.data_parallel_size), seq_length=a.seq_length,
        micro_batch_size=a.micro_batch_size, forward_only=False)
    state.frozen.zero_grads()
    timers("optimizer", log_level=1).start()
    with state.frozen.left_out():
        updated, grad_norm, state.num_zeros_in_grad = state.optimizer.step()
    timers("optimizer").stop()
    if updated:
        state.scheduler.step(increment=global_batch)
    return _reduce_loss(losses), grad_norm, updated


@torch.no_grad()
def evaluate(state: TrainState, dataset=None) -> float | None:
    """Validation loss over --eval-iters global batches, always from the split's first sample."""
    a = state.args
    it = _data_iterator(state, dataset if dataset is not None else state.datasets[1], 0)
    for chunk in state.model:
        chunk.eval()
    losses = []
    with state.param_gather.gathered(), memory_kept_tidy(a, level=2, evaluating=True):
        for _ in range(a.eval_iters):
            losses += get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=it, model=state.model,
                num_microbatches=a.num_microbatches, seq_length=a.seq_length, micro_batch_size=a.micro_batch_size,
                forward_only=True)
    for chunk in state.model:
        chunk.train()
    return _share(_reduce_loss(losses))


def _share(loss: float | None) -> float:
    """The last stage's loss on every rank (stop rules and the saved curve must agree everywhere)."""
    t = collective_tensor([loss or 0.0, float(loss is not None)], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return (t[0] / t[1]).item()


def _save(state: TrainState) -> None:
    state.args.consumed_train_samples = state.consumed_train_samples
    t0 = time.time()
    with state.param_gather.gathered():
        path = save_checkpoint(state.args.save, state.iteration, state.model, state.optimizer, state.scheduler,
                               state.args, state.run_state)
    print_rank_0(f" saved checkpoint {path} in {time.time() - t0:.2f} s")


class Diverged(MegagrowError):
    """A NaN or Inf loss or gradient norm (Megatron-LM's check; --no-check-for-nan-in-loss-and-grad)."""


def _not_finite(loss: float | None, grad_norm: float | None) -> str | None:
    """'loss is nan', 'grad norm is inf', ... if any rank saw one this iteration, else None; every rank
    gets the same answer (the loss exists on the last pipeline stage only), so all stop together."""
    codes = torch.tensor([0.0 if v is None or math.isfinite(v) else 2.0 if math.isnan(v) else 1.0
                          for v in (loss, grad_norm)],
                         device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(codes, op=torch.distributed.ReduceOp.MAX)
    found = [f"{name} is {'nan' if code == 2 else 'inf'}" for name, code in zip(("loss", "grad norm"), codes.tolist())
             if code]
    return found[0] if found else None


def _last_good_checkpoint(args) -> str:
    for root in (args.save, args.load):
        iteration = read_tracker(root) if root else None
        if iteration is not None:
            return f"the newest checkpoint, {iteration_dir(root, iteration)}, is the last good one"
    return "no checkpoint was saved"


def train_iteration(state: TrainState, train_iter, log: MetricsLogger) -> None:
    """One iteration of the loop: a global batch, bookkeeping, metrics."""
    a = state.args
    t0 = time.perf_counter()
    if state.masks and not state.masks.set_iteration(state.iteration):
        state.masks = None
        print_rank_0(f" growth masks fully open at iteration {state.iteration}: removed")
    global_batch = global_batch_at(state.consumed_train_samples, a)  # --rampup-batch-size's ramp
    with memory_kept_tidy(a, level=1):
        loss, grad_norm, updated = train_step(state, train_iter, global_batch)
    if updated:
        state.param_gather.after_update()
    if a.check_for_nan_in_loss_and_grad:
        bad = _not_finite(loss, grad_norm)
        if bad:  # raised before anything of this iteration is counted, logged or saved
            raise Diverged(f"iteration {state.iteration + 1}: {bad}, stopped before saving it "
                           f"(--no-check-for-nan-in-loss-and-grad disables this check); {_last_good_checkpoint(a)}")
    step_seconds = time.perf_counter() - t0
    state.iteration += 1
    state.consumed_train_samples += global_batch
    state.skipped_iterations += not updated
    if a.manual_gc and a.manual_gc_interval and state.iteration % a.manual_gc_interval == 0:
        gc.collect()
    a.num_floating_point_operations_so_far = (getattr(a, "num_floating_point_operations_so_far", 0)
                                              + num_floating_point_operations(a, global_batch))
    params_norm = params_l2_norm(state.model) if a.log_params_norm else None
    log_line = state.iteration % a.log_interval == 0
    if loss is not None:
        lr = state.scheduler.get_lr(main_param_group(state.optimizer))
        log.training(state.iteration, state.consumed_train_samples, loss, lr, grad_norm, step_seconds,
                     state.skipped_iterations, log_line=log_line, global_batch=global_batch,
                     num_zeros=state.num_zeros_in_grad, params_norm=params_norm)
    if log_line and a.timing_log_level:  # collectives: every rank, after the line they belong to
        names = TIMED[a.timing_log_level]
        if a.log_timers_to_tensorboard:
            state.timers.write(names, log.writer, state.iteration, normalizer=a.log_interval, reset=False)
        times = state.timers.get_all_timers_string(names, normalizer=a.log_interval)  # Timers.log's text
        if times:
            print_rank_last(times)


# megatron-core's timer names at each --timing-log-level (the schedules' own at 2), as Megatron-LM logs them.
TIMED = {1: ["forward-backward", "optimizer"]}
TIMED[2] = TIMED[1] + ["batch-generator", "forward-compute", "backward-compute", "forward-recv", "forward-send",
                       "backward-recv", "backward-send", "forward-send-backward-recv", "backward-send-forward-recv"]


def _record_decision(args, iteration: int, rule: StopRule, decision, optimizer_at_start: dict | None) -> None:
    print_rank_0(f" stage stop at iteration {iteration}: {decision.reason}")
    if args.stage_decision_file and torch.distributed.get_rank() == 0:
        record = {"iteration": iteration, "reason": decision.reason, "policy": rule.policy,
                  "flops": args.num_floating_point_operations_so_far, "evidence": decision.evidence,
                  "optimizer_at_start": optimizer_at_start}
        tmp = args.stage_decision_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, default=float)
        os.replace(tmp, args.stage_decision_file)  # written after the checkpoint: it marks the stage done


class ExitSignal:
    """SIGTERM/SIGUSR1 noted by any rank; ranks agree after an iteration (so all save the same one)."""

    def __init__(self, enabled: bool):
        self.enabled, self.received = enabled, False
        if enabled:
            import signal
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._note)

    def _note(self, signum, frame) -> None:
        self.received = True

    def agreed(self) -> bool:
        if not self.enabled:
            return False
        flag = collective_tensor([float(self.received)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


_PROCESS_START = time.time()  # --exit-duration-in-mins counts from here (Megatron-LM: the earliest rank's)


def pretrain(args) -> TrainState:
    state = setup(args)
    log = MetricsLogger(args)
    profiler = Profiler(args)
    try:
        return _train(state, log, profiler)
    finally:
        gc.enable()
        profiler.close()
        log.close()


def _minutes_up(args, started: float) -> float | None:
    """Minutes trained once --exit-duration-in-mins is reached on any rank (all agree), else None."""
    if not args.exit_duration_in_mins:
        return None
    minutes = (time.time() - started) / 60
    done = collective_tensor([float(minutes > args.exit_duration_in_mins)])
    torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MAX)
    return minutes if done.item() else None


def _train(state: TrainState, log: MetricsLogger, profiler: Profiler) -> TrainState:
    args = state.args
    started = collective_tensor([_PROCESS_START], dtype=torch.float64)
    torch.distributed.all_reduce(started, op=torch.distributed.ReduceOp.MIN)
    train_iter = _data_iterator(state, state.datasets[0], state.consumed_train_samples)
    saved_at = state.iteration
    print_rank_0(f" training: {describe(args)}, global batch {args.global_batch_size} "
                 f"({args.num_microbatches} microbatches x {args.micro_batch_size} x DP {args.data_parallel_size}), "
                 f"TP {args.tensor_model_parallel_size} PP {args.pipeline_model_parallel_size}")
    if state.optimizer_at_start:
        log.optimizer(state.iteration, state.optimizer_at_start)
    rule = StopRule(**json.loads(args.stage_stop)) if args.stage_stop else None  # kept out of args: they are saved
    curve = state.run_state["validation_curve"]

    def validate(where: str) -> None:
        loss = evaluate(state)
        log.validation(state.iteration, loss, where)
        curve.append((state.iteration, loss, args.num_floating_point_operations_so_far))

    if args.eval_on_start:
        validate(f"at the start (iteration {state.iteration})")
    exit_signal = ExitSignal(args.exit_signal_handler)
    if args.manual_gc:  # as Megatron-LM: collections at the same iterations on every rank, not when Python likes
        gc.disable()
        gc.collect()
    seen: dict = {}  # the last evaluation's evidence, kept with a stop on the stage's last iteration
    while state.iteration < args.train_iters:
        step_flops = num_floating_point_operations(args, global_batch_at(state.consumed_train_samples, args))
        decision = rule.after_step(state.iteration, args.num_floating_point_operations_so_far, step_flops) \
            if rule else None
        if decision and decision.stop:  # also right after loading a stage's last checkpoint
            decision.evidence = {**seen, **decision.evidence}
            if not curve or curve[-1][0] != state.iteration:
                validate(f"at the end of the stage (iteration {state.iteration})")
            break
        profiler.before_iteration(state.iteration)
        train_iteration(state, train_iter, log)
        it = state.iteration
        profiler.after_iteration(it)
        if args.eval_interval and it % args.eval_interval == 0 and it < args.train_iters:
            validate(f"at iteration {it}")
            decision = rule.after_evaluation(curve) if rule else None
            seen = decision.evidence if decision else seen
            if decision and decision.stop:
                break
        signalled, minutes = exit_signal.agreed(), _minutes_up(args, started.item())
        if signalled or minutes is not None or (args.exit_interval and it % args.exit_interval == 0):
            if args.save:
                _save(state)
            why = ("on a signal" if signalled else f"after {minutes:.2f} minutes (--exit-duration-in-mins)"
                   if minutes is not None else "(--exit-interval)")
            print_rank_0(f" exiting at iteration {it} {why}")
            return state
        if args.save and args.save_interval and it % args.save_interval == 0:
            _save(state)
            saved_at = it
    else:
        decision = None
        if args.eval_iters:
            validate("at the end of training")
    if args.save and saved_at != state.iteration:
        _save(state)
    if decision and decision.stop:
        _record_decision(args, state.iteration, rule, decision, state.optimizer_at_start)
    return state
