"""Megatron-LM flags in the three forms megagrow meets them, translated in one place:
argv (`--num-layers 8`), a plan's dict keyed by flag name (`num_layers: 8`, `disable_bias_linear: true`),
and the trainer's args Namespace (Megatron-LM's dest names: `add_bias_linear=False`). Groups are the
trainer parser's argument groups (model, training, data, parallelism, checkpointing, logging).
"""

from __future__ import annotations

import argparse

from megagrow.training.arguments import build_parser


def flag_key(action: argparse.Action) -> str:
    """A flag's key in a plan: its first option name without dashes (--disable-bias-linear -> disable_bias_linear)."""
    return action.option_strings[0][2:].replace("-", "_")


def _is_switch(action: argparse.Action) -> bool:
    return isinstance(action.const, bool) and action.nargs == 0  # store_true / store_false


def to_argv(values: dict) -> list[str]:
    """argv from a plan's dict: true -> the bare flag, false/None -> left out, lists -> nargs."""
    out = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def from_argv(argv: list[str]) -> dict[str, dict]:
    """The flags given in argv as plan dicts per argument group (only those given)."""
    p = build_parser()
    for action in p._actions:
        action.default, action.required = argparse.SUPPRESS, False
    given = vars(p.parse_args(argv))
    groups = {}
    for group in p._action_groups:
        for action in group._group_actions:
            if action.dest in given:
                value = True if _is_switch(action) else given[action.dest]
                groups.setdefault(group.title, {})[flag_key(action)] = value
    return groups


def from_args(args: argparse.Namespace) -> dict[str, dict]:
    """A Namespace (e.g. a checkpoint's saved args) as plan dicts per group, keeping what differs from the defaults."""
    groups = {}
    for group in build_parser()._action_groups:
        for action in group._group_actions:
            if not action.option_strings or not hasattr(args, action.dest):
                continue
            value = getattr(args, action.dest)
            if _is_switch(action):
                value = value == action.const or None
            if value is not None and value != action.default:
                groups.setdefault(group.title, {})[flag_key(action)] = value
    return groups
