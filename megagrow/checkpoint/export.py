"""`megagrow checkpoint export`: a Megatron checkpoint (any TP/PP, either format, grown or not) as a Hugging Face
model directory: config.json, safetensors shards with their index, generation_config.json, the run's tokenizer."""

from __future__ import annotations

import re

from megagrow.checkpoint.errors import CheckpointError
from megagrow.checkpoint.hf_stream import HFView, copy_tokenizer, generation_config, write_hf
from megagrow.checkpoint.io import Progress, check_source, open_checkpoint, written_bytes
from megagrow.checkpoint.target import check_target, writing
from megagrow.model.hf_layout import HFConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count (transformers' max_shard_size spelling)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(text).upper())
    if not m:
        raise CheckpointError(f"--max-shard-size {text}: not a size (e.g. 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def export(load: str, save: str, family: str | None = None, max_shard_size: str = "5GB", force: bool = False,
           progress: bool = True) -> dict:
    """Write `load` as a Hugging Face model under `save` (partial sibling, validated, renamed)."""
    shard_bytes = parse_size(max_shard_size)
    target = check_target(save, force, load)
    view = open_checkpoint(load)
    try:
        check_source(view, with_optimizer=False)
        masks = view.run_state.get("growth_masks")
        if masks:
            raise CheckpointError(f"{load}: growth masks ({masks['kind']}) still open the new width until iteration "
                                  f"{masks['end']}; train past it, then export")
        with writing(target, written_bytes(view.args, False)) as partial:
            try:
                config = write_hf(view, partial, family, shard_bytes, Progress(view.num_layers, "exporting", progress))
            except HFConfigError as e:
                raise CheckpointError(f"{load}: {e}") from None
            tokenizer = copy_tokenizer(view.args, partial)
            generation_config(partial)
            _validate(partial, config, save)
    finally:
        view.close()
    return {"path": target.final, "config": config, "tokenizer": tokenizer}


def _validate(out: str, config: dict, save: str) -> None:
    written = HFView(out)
    try:
        problems = written.problems()
    finally:
        written.close()
    if problems:
        raise CheckpointError(f"the model written for --save {save} does not validate ({problems[0]}); "
                              "nothing was written")
