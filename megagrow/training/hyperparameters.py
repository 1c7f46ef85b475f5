"""Which optimizer hyper-parameters a resumed run trains with: this run's flags, or the checkpoint's.

torch's `Optimizer.load_state_dict` brings back every per-group value (megatron-core's `max_lr`/`min_lr`,
which its scheduler reads, and Adam's betas and eps), and the scheduler's own state holds the peak, floor,
warmup, decay and weight decay. As in Megatron-LM: `--override-opt_param-scheduler` makes this run's flags
win (so does `--restart-lr-schedule-at` when it matches, and a staged run passes the override to every stage
that starts from an earlier one), `--use-checkpoint-opt_param-scheduler` keeps the checkpoint's, and with
neither the scheduler keeps the checkpoint's schedule (megatron-core's default; Megatron-LM itself refuses a
difference, which would stop every resume that extends --train-iters). Adam's moments and step counts always
come from the checkpoint.
"""

from __future__ import annotations


def values_to_build(args) -> dict[str, float]:
    """lr, min_lr and weight_decay to build the optimizer's groups with before --load: the checkpoint's.
    megatron-core (0.19) matches saved groups to new ones by such per-group values and keeps some of the new
    ones (start_wd/end_wd); `apply_after_load` then settles them. Without a checkpoint: the flags'."""
    from megagrow.checkpoint.errors import read_tracker
    flags = {"lr": args.lr, "min_lr": args.min_lr, "weight_decay": args.weight_decay}
    if not args.load or args.no_load_optim or args.finetune or read_tracker(args.load) is None:
        return flags
    from megagrow.checkpoint.io import open_checkpoint
    view = open_checkpoint(args.load)
    try:
        groups = view.optimizer.param_groups if view.optimizer else []
    finally:
        view.close()
    if not groups or "max_lr" not in groups[0]:
        return flags
    g = main_param_group(view.optimizer)
    return {"lr": g["max_lr"], "min_lr": g.get("min_lr", args.min_lr),
            "weight_decay": g.get("start_wd", g.get("weight_decay", args.weight_decay))}


def main_param_group(optimizer) -> dict:
    """The first group on the run's own LR schedule (not --decoupled-lr's embedding and output layer):
    megatron-core marks those `default_config`."""
    groups = optimizer.param_groups
    return next((g for g in groups if g.get("default_config", True)), groups[0])


def flag_values(args, group: dict) -> dict[str, object]:
    """The per-group values the run's flags ask for (megatron-core's key names); --decoupled-lr's own for
    the embedding and output layer's groups."""
    decoupled = not group.get("default_config", True) and args.decoupled_lr is not None
    return {"max_lr": args.decoupled_lr if decoupled else args.lr,
            "min_lr": (args.decoupled_min_lr if args.decoupled_min_lr is not None else args.min_lr) if decoupled
            else args.min_lr, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_eps}


def apply_after_load(optimizer, scheduler, args, restarted: bool, built: dict) -> None:
    """Settle the loaded param groups: this run's values, or the checkpoint's (neither flag: as loaded).
    `built`: the checkpoint's values the groups were built with (values_to_build)."""
    if args.use_checkpoint_opt_param_scheduler:
        # megatron-core's scheduler restores the LR schedule but not its weight decay: the checkpoint's too
        scheduler.start_wd = scheduler.end_wd = built["weight_decay"]
        scheduler.step(0)
        return
    if args.override_opt_param_scheduler or restarted:
        for group in optimizer.param_groups:
            for key, value in flag_values(args, group).items():
                if key in group or key in ("max_lr", "min_lr"):
                    group[key] = value
            for key in ("start_wd", "end_wd"):  # megatron-core 0.19 keeps the decay per group too
                if key in group:
                    group[key] = args.weight_decay
        scheduler.step(0)  # the lr and weight decay of this run's schedule at the loaded step, on every group
    # Neither flag: the checkpoint's schedule (megatron-core's default when it is not told), as before.


def in_effect(optimizer, scheduler) -> dict[str, object]:
    """What the next iteration trains with (the first group's values; weight decay of each group)."""
    g = main_param_group(optimizer)
    return {"lr": scheduler.get_lr(g), "max_lr": g.get("max_lr", scheduler.max_lr),
            "min_lr": g.get("min_lr", scheduler.min_lr),
            "weight_decay": sorted({grp["weight_decay"] for grp in optimizer.param_groups}),
            "betas": list(g.get("betas", ())), "eps": g.get("eps"), "schedule_step": scheduler.num_steps}
